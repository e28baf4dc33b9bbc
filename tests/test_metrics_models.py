"""Feature models for evaluation vs their references, on the same seeded random weights.

InceptionV3 vs pytorch-fid (its own network and preprocessing from uint8 images), CLIP vs
transformers' CLIPModel, DINOv2 vs transformers' Dinov2Model; tolerance 1e-4 relative to the
largest reference value. Tiny configs are the main guard; the ViT-L/14 shapes are marked slow.
Weights reach the MLX models through the real converter (`python -m convert --feature-model`).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from metrics_reference import (
    CLIP_L14_TEXT,
    CLIP_L14_VISION,
    DINOV2_L14,
    make_tiny_clip,
    make_tiny_dinov2,
    random_inception_state,
    randomize,
    reference_inception,
    torch_state_to_mx,
)

from convert.__main__ import main as convert_main
from convert.feature_models import clip_to_mlx, convert_feature_model, dinov2_to_mlx
from mlx_sd.metrics.clip_model import CLIPModel, CLIPModelConfig, load_clip
from mlx_sd.metrics.dinov2 import Dinov2Config, Dinov2Model, load_dinov2
from mlx_sd.metrics.features import FeatureModel
from mlx_sd.metrics.images import clip_pixels, resize_matrix
from mlx_sd.metrics.inception import load_inception
from mlx_sd.weights import load_strict

torch = pytest.importorskip("torch")
TOL = 1e-4


def rel(a, b, what: str = "") -> float:
    """max |a - b| / max |b|; printed (pytest -s) so the figure can be quoted."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    r = float(np.abs(a - b).max() / np.abs(b).max())
    if what:
        print(f"{what}: relative max error {r:.2e}")
    return r


def smooth_images(n: int, h: int, w: int, seed: int) -> np.ndarray:
    """uint8 [n, h, w, 3]: low-frequency colour fields plus noise (real-image-like statistics)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = []
    for _ in range(n):
        f = rng.uniform(1, 6, (3, 2))
        img = np.stack([np.sin(f[c, 0] * 6 * yy + rng.uniform(0, 6)) * np.cos(f[c, 1] * 6 * xx) for c in range(3)], -1)
        out.append(np.clip(127.5 * (img + 1) + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8))
    return np.stack(out)


# --- resampling ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("n_in,n_out", [(64, 299), (37, 16), (16, 37), (300, 299), (5, 5)])
def test_resize_matrix_equals_torch_interpolate(mode, n_in, n_out):
    x = torch.randn(1, 2, n_in, 3, generator=torch.Generator().manual_seed(n_in))
    ref = torch.nn.functional.interpolate(x, size=(n_out, 3), mode=mode, align_corners=False)
    ours = np.einsum("oh,bchw->bcow", resize_matrix(n_in, n_out, mode), x.numpy())
    assert rel(ours, ref.numpy()) <= 1e-5  # float32 rounding of the weights


# --- InceptionV3 (pytorch-fid) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def inception_pair(tmp_path_factory):
    state = random_inception_state(0)
    pth = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(state, pth)
    out = pth.parent / "mlx"
    assert convert_main(["--feature-model", "inception", str(pth), str(out)]) == 0
    return reference_inception(state), out


def test_inception_pool3_matches_pytorch_fid_from_uint8(inception_pair):
    ref, folder = inception_pair
    images = smooth_images(2, 96, 128, seed=1)  # resized to 299 inside, as pytorch-fid does
    with torch.no_grad():
        expected = ref(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)[0].squeeze(-1).squeeze(-1)
    model = FeatureModel.load(folder)
    ours = model.image_features(list(images))
    assert ours.shape == (2, 2048)
    assert float(expected.abs().mean()) > 1e-3  # the random network must not have collapsed
    assert rel(ours, expected.numpy(), "Inception pool3 vs pytorch-fid (uint8 in)") <= TOL


def test_inception_converter_reads_pickle_without_torch_and_strictly(inception_pair, tmp_path, monkeypatch, capsys):
    _, folder = inception_pair
    load_inception(folder)  # strict: every key and shape
    state = random_inception_state(1)
    state.pop("Mixed_7c.branch_pool.conv.weight")
    state["extra.weight"] = torch.zeros(3)
    pth = tmp_path / "broken.pth"
    torch.save(state, pth)
    monkeypatch.setitem(__import__("sys").modules, "torch", None)
    assert convert_main(["--feature-model", "inception", str(pth), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "Mixed_7c.branch_pool.conv.weight" in err and "extra.weight" in err
    assert not (tmp_path / "o").exists()


# --- CLIP ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    src = tmp_path_factory.mktemp("clip") / "hf"
    ref = make_tiny_clip(src)
    out = convert_feature_model("clip", src, src.parent / "mlx")
    return ref, src, out


def _pooled(x):
    return x if isinstance(x, torch.Tensor) else x.pooler_output


def test_tiny_clip_image_and_text_embeddings(tiny_clip):
    from transformers import CLIPTokenizer

    ref, src, out = tiny_clip
    model = load_clip(out)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = _pooled(ref.get_image_features(pixel_values=pixels)).numpy()
    ours = np.array(model.image_embeds(mx.array(pixels.permute(0, 2, 3, 1).numpy())))
    assert rel(ours, expected, "tiny CLIP image embeds") <= TOL

    prompts = ["a photo of black shoes", "white sneakers on white background, high quality product photography"]
    tok = CLIPTokenizer.from_pretrained(src)
    batch = tok(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = _pooled(ref.get_text_features(**batch)).numpy()
    ids = FeatureModel.load(out).tokenizer(prompts)  # 77 tokens padded with end-of-text
    assert rel(np.array(model.text_embeds(mx.array(ids))), expected, "tiny CLIP text embeds") <= TOL
    assert rel(FeatureModel.load(out).text_features(prompts), expected) <= TOL


def test_clip_pixels_match_clip_image_processor():
    from transformers import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    for shape in ((40, 57), (57, 40), (32, 32), (100, 33)):
        im = smooth_images(1, *shape, seed=shape[0])[0]
        expected = proc(images=[im], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        assert np.abs(clip_pixels(im, 32) - expected).max() < 1e-5, shape


@pytest.mark.slow
def test_clip_vit_l14_shape(tmp_path):
    from transformers import CLIPConfig
    from transformers import CLIPModel as RefCLIP

    torch.manual_seed(0)
    vision = {k: v for k, v in CLIP_L14_VISION.items() if k != "projection_dim"}
    text = {k: v for k, v in CLIP_L14_TEXT.items() if k != "projection_dim"}
    ref = RefCLIP(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)).eval()
    randomize(ref, 0)
    config = CLIPModelConfig.from_transformers(ref.config.to_dict())
    model = load_strict(CLIPModel(config), clip_to_mlx(torch_state_to_mx(ref)))
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 49406, (2, 77), generator=torch.Generator().manual_seed(2))
    ids[:, 0], ids[0, 9:], ids[1, 30:] = 49406, 49407, 49407  # eos_token_id 2: pooled at the largest id
    with torch.no_grad():
        img_ref = _pooled(ref.get_image_features(pixel_values=pixels)).numpy()
        txt_ref = _pooled(ref.get_text_features(input_ids=ids)).numpy()
    assert rel(np.array(model.image_embeds(mx.array(pixels.permute(0, 2, 3, 1).numpy()))), img_ref,
               "CLIP ViT-L/14 image embeds") <= TOL
    assert rel(np.array(model.text_embeds(mx.array(ids.numpy()))), txt_ref, "CLIP ViT-L/14 text embeds") <= TOL


# --- DINOv2 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(56, 56), (42, 70), (112, 112)])  # the training grid, and resampled positions
def test_tiny_dinov2(tmp_path_factory, size):
    src = tmp_path_factory.mktemp("dino") / "hf"
    ref = make_tiny_dinov2(src)
    out = src.parent / "mlx"
    assert convert_main(["--feature-model", "dinov2", str(src), str(out)]) == 0
    model = load_dinov2(out)
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ref(pixel_values=pixels).pooler_output.numpy()
    ours = np.array(model(mx.array(pixels.permute(0, 2, 3, 1).numpy())))
    assert rel(ours, expected, f"tiny DINOv2 at {size}") <= TOL


@pytest.mark.slow
def test_dinov2_vit_l14_shape_at_224():
    from transformers import Dinov2Config as RefConfig
    from transformers import Dinov2Model as RefModel

    torch.manual_seed(0)
    ref = RefModel(RefConfig(**DINOV2_L14)).eval()
    randomize(ref, 0)
    model = load_strict(Dinov2Model(Dinov2Config.from_transformers(ref.config.to_dict())),
                        dinov2_to_mlx(torch_state_to_mx(ref)))
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(pixel_values=pixels).pooler_output.numpy()
    assert rel(np.array(model(mx.array(pixels.permute(0, 2, 3, 1).numpy()))), expected, "DINOv2 ViT-L/14 at 224") <= TOL


def test_hub_id_downloads_only_one_weights_file(tmp_path, monkeypatch):
    import huggingface_hub

    src = tmp_path / "hf"
    make_tiny_dinov2(src)
    calls = []
    monkeypatch.setattr(huggingface_hub, "list_repo_files",
                        lambda repo, revision=None: ["config.json", "model.safetensors", "pytorch_model.bin"])

    def fake_snapshot(repo, revision=None, allow_patterns=None):
        calls.append((repo, revision, allow_patterns))
        return str(src)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    out = convert_feature_model("dinov2", "facebook/dinov2-large", tmp_path / "mlx", revision="main")
    assert calls[0][:2] == ("facebook/dinov2-large", "main")
    assert "model.safetensors" in calls[0][2] and "pytorch_model.bin" not in calls[0][2]
    load_dinov2(out)
