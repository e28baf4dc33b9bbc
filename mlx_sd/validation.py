"""Validation images during training: fixed prompts and seeds, so steps are comparable.

Files: `validation/epoch{e:03d}_step{s:04d}_prompt{p}_img{i}.png` (p, i from 0) and one
`epoch{e:03d}_step{s:04d}_grid.png` per validation (a row per prompt). The text encoder and VAE
are loaded for the validation and dropped afterwards, in `dtype`. With float32 or the training
base's own dtype the UNet is the one being trained (LoRA unfused; a low-precision base samples in
its own dtype), so nothing is copied; a half `dtype` over a float32 base samples with a copy in that
dtype with the adapters fused (half the float32 UNet's memory, dropped afterwards), so training's
weights are never rounded. A text encoder being trained (LoRA) is used as it is, in float32.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from PIL import Image

DEFAULT_PROMPTS = (
    "A professional product photo of black casual shoes on white background, high quality, product photography",
    "A professional product photo of brown leather casual shoes on white background, high quality",
    "A professional product photo of white casual sneakers on white background, centered, product photography",
    "A professional product photo of blue casual shoes on white background, modern design, product photography",
)


def image_name(epoch: int, step: int, prompt: int, image: int) -> str:
    return f"epoch{epoch:03d}_step{step:04d}_prompt{prompt}_img{image}.png"


def grid(images: list[Image.Image], rows: int) -> Image.Image:
    cols = -(-len(images) // rows)
    w, h = images[0].size
    out = Image.new("RGB", (cols * w, rows * h), "white")
    for k, im in enumerate(images):
        out.paste(im, ((k % cols) * w, (k // cols) * h))
    return out


def sampling_copy(unet, dtype: mx.Dtype):
    """A plain UNet in `dtype` with every LoRA layer of `unet` fused; `unet` is left as it is."""
    from lora.layers import lora_layers

    from .unet import UNet2DConditionModel

    layers = lora_layers(unet)
    skip = tuple(p + "." for p in layers)
    params = [(k, v.astype(dtype)) for k, v in tree_flatten(unet.parameters()) if not k.startswith(skip)]
    for path, layer in layers.items():
        fused = layer.fuse()  # in the base's dtype; cast once more below
        params += [(f"{path}.{k}", v.astype(dtype)) for k, v in tree_flatten(fused.parameters())]
    # The new model's random initial weights are lazy and replaced before anything evaluates them.
    copy = UNet2DConditionModel(unet.config)
    copy.update(tree_unflatten(params))
    copy.attention_chunk = unet.attention_chunk
    copy.eval()
    return copy


@contextmanager
def eval_mode(*models):
    """The models in eval mode (no LoRA dropout) inside the block, each back in its own mode after."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def validation_pipeline(folder, unet, tokenizer, dtype: str = "float32", text_encoder=None):
    """The pipeline validation samples with (see the module's text): the text encoder and VAE loaded
    in `dtype` (a trained `text_encoder` as it is), the UNet itself or its fused half copy."""
    from .pipeline import StableDiffusion, as_dtype

    dt = as_dtype(dtype)
    base = unet.conv_in.weight.dtype
    sampling_unet = unet if dt in (base, mx.float32) else sampling_copy(unet, dt)
    if text_encoder is None:
        text_encoder = folder.text_encoder()
        text_encoder.set_dtype(dt)
    vae = folder.vae()
    vae.set_dtype(dt)
    return StableDiffusion(tokenizer, text_encoder, sampling_unet, vae, folder.scheduler_config(), compile=False)


def run_validation(folder, unet, tokenizer, prompts, out_dir: Path, epoch: int, step: int,
                   num_images: int = 4, steps: int = 25, sampler: str = "dpm++2m",
                   guidance_scale: float = 7.5, seed: int = 0, resolution: int = 512,
                   progress: bool = False, dtype: str = "float32", text_encoder=None, width: int | None = None,
                   height: int | None = None) -> list[Path]:
    """Render every prompt `num_images` times at `width` x `height` (default: a square of `resolution`)."""
    from .pipeline import save_png

    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = validation_pipeline(folder, unet, tokenizer, dtype, text_encoder)
    # The same seed for image i of prompt p at every validation: changes come from training only.
    seeds = [seed + 1000 * p + i for p in range(len(prompts)) for i in range(num_images)]
    with eval_mode(unet, pipe.text_encoder):
        images = pipe.generate(list(prompts), num_images_per_prompt=num_images, steps=steps,
                               guidance_scale=guidance_scale, sampler=sampler, seed=seeds,
                               height=height or resolution, width=width or resolution,
                               batch_size=min(4, len(seeds)), progress=progress)
    files = []
    for k, im in enumerate(images):
        p, i = divmod(k, num_images)
        path = out_dir / image_name(epoch, step, p, i)
        save_png(im, path)
        files.append(path)
    save_png(grid(images, rows=len(prompts)), out_dir / f"epoch{epoch:03d}_step{step:04d}_grid.png")
    del pipe, images
    mx.clear_cache()  # sampling buffers go back before training resumes
    return files


def measure_peak_gb(folder, unet, tokenizer, prompts, num_images: int = 4, guidance_scale: float = 7.5,
                    resolution: int = 512, sampler: str = "dpm++2m", width: int | None = None,
                    height: int | None = None, dtype: str = "float32", text_encoder=None) -> float:
    """MLX's peak (GB) over one validation batch as `run_validation` makes it (same pipeline: a
    trained text encoder is not loaded twice, a half `dtype` loads half encoders and the fused
    copy): one sampler step of the classifier-free-guidance batch and the VAE decode. Everything
    training keeps (the UNet, the optimizer state) stays counted, as during a real validation."""
    n = min(4, len(prompts) * num_images)  # run_validation's batch
    mx.clear_cache()
    mx.reset_peak_memory()
    pipe = validation_pipeline(folder, unet, tokenizer, dtype, text_encoder)
    with eval_mode(unet, pipe.text_encoder):
        pipe.generate(list(prompts)[:1] * n, steps=1, guidance_scale=guidance_scale, sampler=sampler, seed=0,
                      height=height or resolution, width=width or resolution, batch_size=n, output_type="np")
    peak = mx.get_peak_memory() / 1e9
    del pipe
    mx.clear_cache()
    return peak
