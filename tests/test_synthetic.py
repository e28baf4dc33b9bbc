"""Half-precision sampling, bulk streaming and validation in a low dtype.

float16 / bfloat16 sampling is compared with float32 on the same weights, prompt and seed: the
final latents' relative error (`rel_err`) and the decoded images' PSNR (images in [0, 1]). Measured
on the tiny fixture at 64 px, 6 PNDM steps, CFG 7.5 (printed with -s): float16 9.2e-3 and 58.0 dB,
bfloat16 3.2e-2 and 43.8 dB; the bounds leave about 3x (13 dB) of room over these. On the full
SD1.5 shape (random weights, 256 px, 1 DDIM step): float16 5.2e-5 and 68.3 dB, bfloat16 4.2e-4 and 50.2 dB.
"""

import math

import mlx_sd  # noqa: F401, I001  (fast BLAS before mlx.core)

import mlx.core as mx
import numpy as np
import pytest
from fixtures import rel_err
from mlx.utils import tree_flatten

from mlx_sd.pipeline import StableDiffusion, as_dtype

PROMPT = "a photo of black casual shoes on white background"
KW = {"negative_prompt": "blue leather", "steps": 6, "guidance_scale": 7.5, "sampler": "pndm", "seed": 3}
# Bound on the final latents' relative error, and on the images' PSNR (dB), per dtype.
BOUNDS = {"float16": (3e-2, 45.0), "bfloat16": (1e-1, 30.0)}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def compare(ref: StableDiffusion, low: StableDiffusion, what: str, size: int, cache: dict | None = None, **kw):
    """`cache` keeps the float32 run for the next dtype compared on the same pipeline and settings."""
    cache = {} if cache is None else cache
    key = (size, tuple(sorted(kw.items())))
    if key not in cache:
        cache[key] = ref.generate(PROMPT, height=size, width=size, output_type="np", return_latents=True, **kw)
    img32, lat32 = cache[key]
    img, lat = low.generate(PROMPT, height=size, width=size, output_type="np", return_latents=True, **kw)
    assert lat.dtype == mx.float32 and img.dtype == np.float32  # scheduler state and output stay float32
    err, db = rel_err(lat, lat32), psnr(img, img32)
    print(f"{what}: final latents rel_err {err:.2e}, image PSNR {db:.1f} dB")
    return err, db


@pytest.fixture(scope="module")
def sd32(tiny_mlx_dir):
    return StableDiffusion.from_folder(tiny_mlx_dir, compile=False)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_matches_float32_on_the_fixture(tiny_mlx_dir, sd32, dtype):
    low = StableDiffusion.from_folder(tiny_mlx_dir, compile=False, dtype=dtype)
    for m in (low.text_encoder, low.unet, low.vae):  # every weight is cast
        assert {v.dtype for _, v in tree_flatten(m.parameters())} == {as_dtype(dtype)}
    err, db = compare(sd32, low, f"tiny fixture, 64 px, {dtype} vs float32", 64, **KW)
    max_err, min_db = BOUNDS[dtype]
    assert 0 < err <= max_err and db >= min_db


@pytest.mark.slow  # float16 matmuls are slow on an x86 CPU: minutes here
def test_no_nan_in_100_float16_images(tiny_mlx_dir):
    low = StableDiffusion.from_folder(tiny_mlx_dir, compile=False, dtype="float16")
    images = low.generate([PROMPT, "white sneakers"], num_images_per_prompt=50, steps=4, seed=0, height=64,
                          width=64, output_type="np", batch_size=50)
    assert images.shape == (100, 64, 64, 3)
    assert np.isfinite(images).all()
    spread = images.reshape(100, -1).std(axis=1)
    assert spread.min() > 1e-3, spread.min()  # no flat (black) image


def test_non_finite_half_decode_is_redone_in_float32(tiny_mlx_dir):
    low = StableDiffusion.from_folder(tiny_mlx_dir, compile=False, dtype="float16")
    z = mx.array(np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32))
    z = z * mx.array([1.0, 3e4]).reshape(2, 1, 1, 1)  # the second overflows float16 inside the VAE
    half = low.vae.decode((z / low.vae.scaling_factor).astype(mx.float16))
    assert not np.isfinite(np.array(half[1].astype(mx.float32))).all()  # the case being guarded
    out = low._decode_finish(z, low._decode_start(z))
    assert np.isfinite(out).all()
    low.vae.set_dtype(mx.float32)
    want = np.array(low.vae.decode(z / low.vae.scaling_factor))
    assert rel_err(out[1], want[1]) <= 1e-5  # redone in float32 (from the same half weights)
    assert rel_err(out[0], want[0]) <= 2e-2  # the finite one kept its float16 decode
    low.vae.set_dtype(mx.float16)
    assert low.vae.post_quant_conv.weight.dtype == mx.float16  # and the VAE is half again


@pytest.mark.parametrize("overlap", [True, False])
def test_stream_makes_what_generate_makes(sd32, overlap):
    """Bulk streaming (decode overlapped with the next batch, empty batches kept in place) gives
    each image exactly as `generate` makes it alone."""
    kw = {"steps": 2, "height": 64, "width": 64}
    batches = [(["white sneakers", PROMPT], [5, 6]), ([], []), ([PROMPT], [7])]
    got = list(sd32.stream(batches, overlap=overlap, **kw))
    assert [len(b) for b in got] == [2, 0, 1]
    for (prompts, seeds), out in zip(batches, got):
        for p, s, im in zip(prompts, seeds, out):
            alone = np.asarray(sd32.generate(p, seed=s, **kw)[0])
            assert np.abs(alone.astype(int) - im.astype(int)).max() <= 1  # uint8 rounding of a batched run


def test_text_embeddings_are_encoded_once(sd32, monkeypatch):
    calls = []
    real = sd32.text_encoder.__call__

    class Counting:
        def __call__(self, ids):
            calls.append(ids.shape[0])
            return real(ids)

    sd32._text_cache.clear()
    monkeypatch.setattr(sd32, "text_encoder", Counting())
    a = sd32._encode(["x y", "x y", "z"])
    b = sd32._encode(["z", "x y", "w"])
    assert calls == [2, 1]  # "x y" and "z" once, then only the new "w"
    assert np.array_equal(np.array(a[2]), np.array(b[0]))


def test_half_validation_copy_leaves_training_weights(sd32):
    """--validation_dtype float16: the sampling copy has the adapters fused, in float16, and the
    training UNet (float32 base + LoRA) is not touched."""
    from lora.layers import LoRAConfig, inject_lora, lora_layers
    from mlx_sd.unet import UNet2DConditionModel
    from mlx_sd.validation import sampling_copy

    unet = UNet2DConditionModel(sd32.unet.config)
    unet.update(sd32.unet.parameters())
    mx.random.seed(0)
    inject_lora(unet, LoRAConfig(r=4, alpha=4.0))
    rng = np.random.default_rng(0)
    for layer in lora_layers(unet).values():
        layer.lora_B.weight = mx.array(rng.standard_normal(layer.lora_B.weight.shape).astype(np.float32) * 0.1)
    before = {k: np.array(v) for k, v in tree_flatten(unet.parameters())}
    x = mx.array(rng.standard_normal((1, 8, 8, 4)).astype(np.float32))
    ctx = mx.array(rng.standard_normal((1, 77, 32)).astype(np.float32))
    t = mx.array([500.0])
    want = unet(x, t, ctx)
    # The fusion itself, in float32: the same function as LoRA on top of the base.
    fused32 = sampling_copy(unet, as_dtype("float32"))
    assert rel_err(fused32(x, t, ctx), want) <= 1e-4  # float32 rounding of (W + BA) x vs W x + B A x
    assert rel_err(sd32.unet(x, t, ctx), want) > 5e-2  # the adapters do act
    copy = sampling_copy(unet, as_dtype("float16"))
    assert {v.dtype for _, v in tree_flatten(copy.parameters())} == {mx.float16}
    err = rel_err(copy(x, t, ctx).astype(mx.float32), want)
    print(f"fused float16 copy vs training UNet (one UNet call): rel_err {err:.2e}")
    assert err <= 1e-1  # float16 over one tiny random UNet call: 4e-3 to 3e-2 measured
    after = {k: np.array(v) for k, v in tree_flatten(unet.parameters())}
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_on_the_full_sd15_shape(sd15_random, dtype):
    """The full SD1.5 UNet, VAE and text encoder with random weights, 32x32 latents (256 px)."""
    ref, low, cache = sd15_random
    for mine, base in zip((low.text_encoder, low.unet, low.vae), (ref.text_encoder, ref.unet, ref.vae)):
        mine.update(base.parameters())  # cast from the float32 arrays, not from the dtype that ran before
    low.set_dtype(dtype)
    # One DDIM step: every UNet block, the text encoder and the VAE decoder at full shape, in a
    # fraction of the time PNDM's 3 steps (4 UNet calls) take with float16 matmuls on an x86 CPU.
    err, db = compare(ref, low, f"SD1.5 shape (random weights), 256 px, 1 DDIM step, {dtype} vs float32", 256,
                      cache, **{**KW, "steps": 1, "sampler": "ddim"})
    max_err, min_db = BOUNDS[dtype]
    assert 0 < err <= max_err and db >= min_db


@pytest.fixture(scope="module")
def sd15_random():
    from mlx_sd.clip import CLIPTextModel
    from mlx_sd.config import CLIPTextConfig, SchedulerConfig, UNetConfig, VAEConfig, read_json
    from mlx_sd.configs import SD15
    from mlx_sd.tokenizer import Tokenizer
    from mlx_sd.unet import UNet2DConditionModel
    from mlx_sd.vae import AutoencoderKL

    mx.random.seed(0)
    parts = (CLIPTextModel(CLIPTextConfig.from_diffusers(read_json(SD15 / "text_encoder" / "config.json"))),
             UNet2DConditionModel(UNetConfig.from_diffusers(read_json(SD15 / "unet" / "config.json"))),
             AutoencoderKL(VAEConfig.from_diffusers(read_json(SD15 / "vae" / "config.json"))))
    for m in parts:
        mx.eval(m.parameters())
    sched = SchedulerConfig.from_diffusers(read_json(SD15 / "scheduler" / "scheduler_config.json"))
    ref = StableDiffusion(Tokenizer(SD15 / "tokenizer"), *parts, sched, compile=False)
    # The low-precision pipeline: other modules holding the same arrays (set_dtype replaces its own).
    copies = []
    for m in parts:
        c = type(m)(m.config)
        c.update(m.parameters())
        copies.append(c)
    low = StableDiffusion(Tokenizer(SD15 / "tokenizer"), *copies, sched, compile=False)
    return ref, low, {}


def test_run_validation_in_float16(tiny_mlx_dir, tmp_path):
    """train.py --validation_dtype float16: images written, the training UNet unchanged and still float32."""
    from lora.layers import LoRAConfig, inject_lora
    from mlx_sd.model_folder import ModelFolder
    from mlx_sd.validation import run_validation

    folder = ModelFolder(tiny_mlx_dir)
    unet = folder.unet()
    inject_lora(unet, LoRAConfig(r=4, alpha=4.0))
    before = {k: np.array(v) for k, v in tree_flatten(unet.parameters())}
    files = run_validation(folder, unet, folder.tokenizer(), [PROMPT], tmp_path, 0, 1, num_images=2, steps=2,
                           resolution=64, dtype="float16")
    assert [f.name for f in files] == ["epoch000_step0001_prompt0_img0.png", "epoch000_step0001_prompt0_img1.png"]
    assert (tmp_path / "epoch000_step0001_grid.png").is_file()
    after = {k: np.array(v) for k, v in tree_flatten(unet.parameters())}
    assert all(after[k].dtype == np.float32 and np.array_equal(before[k], after[k]) for k in before)
