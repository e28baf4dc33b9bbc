"""`mlx-sd-demo`: a complete training run in about a minute, with nothing downloaded.

1. A tiny SD1.5-shaped model (same block structure, narrow layers, the real SD1.5 tokenizer
   and scheduler config) is made by MLX itself with random weights, as a converted folder.
2. A procedural "product photo" dataset: shoe-like shapes in varied colours on white, with
   captions, in the `images/` + `captions.json` layout train.py reads.
3. `train.py` runs on it with validation images, checkpoints and adapter export.

The model is random, so the validation images are noise-like: the point is the whole path,
end to end, on this machine. Swap in real weights with `python -m convert` (see README).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .configs import SD15

TEXT = dict(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)
UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=[32, 64, 64, 64], layers_per_block=2,
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            cross_attention_dim=64, attention_head_dim=2, norm_num_groups=32)
VAE = dict(sample_size=128, in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[32, 32, 64, 64],
           layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
           norm_num_groups=32, scaling_factor=0.18215)

COLOURS = {
    "black": (25, 25, 28), "brown leather": (110, 65, 35), "white": (235, 235, 230), "blue": (40, 75, 190),
    "red": (190, 35, 40), "green": (50, 130, 70), "grey": (120, 120, 125), "tan": (200, 160, 110),
}
STYLES = ["casual shoes", "casual sneakers", "low-top sneakers", "loafers"]


def make_tiny_model(out: Path, seed: int = 0) -> Path:
    """Write a converted model folder with MLX-initialised random weights (no torch involved)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from .clip import CLIPTextModel
    from .config import CLIPTextConfig, UNetConfig, VAEConfig
    from .io import atomic_folder
    from .model_folder import copy_extras, write_marker
    from .unet import UNet2DConditionModel
    from .vae import AutoencoderKL

    mx.random.seed(seed)
    parts = {
        "text_encoder": ({"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **TEXT},
                         CLIPTextModel(CLIPTextConfig.from_diffusers(TEXT))),
        "unet": ({"_class_name": "UNet2DConditionModel", **UNET},
                 UNet2DConditionModel(UNetConfig.from_diffusers(UNET))),
        "vae": ({"_class_name": "AutoencoderKL", **VAE}, AutoencoderKL(VAEConfig.from_diffusers(VAE))),
    }
    with atomic_folder(out) as tmp:  # a re-run replaces the demo model whole
        for name, (config, module) in parts.items():
            (tmp / name).mkdir(parents=True)
            (tmp / name / "config.json").write_text(json.dumps(config, indent=2))
            mx.save_safetensors(str(tmp / name / "model.safetensors"), dict(tree_flatten(module.parameters())),
                                metadata={"format": "mlx"})
        copy_extras(SD15, tmp)
        write_marker(tmp, "mlx-sd-demo tiny random model", "float32")
    return out


def draw_shoe(size: int, colour, rng: np.random.Generator) -> Image.Image:
    """A side view of a shoe: sole, upper, toe cap, laces and a soft shadow, on white."""
    s = size / 128
    im = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(im)
    dx, dy = rng.uniform(-8, 8) * s, rng.uniform(-6, 6) * s
    length, height = rng.uniform(80, 100) * s, rng.uniform(34, 46) * s
    x0, base = (size - length) / 2 + dx, size * 0.72 + dy
    d.ellipse([x0 - 4 * s, base + 3 * s, x0 + length + 4 * s, base + 11 * s], fill=(225, 225, 225))  # shadow
    sole = (250, 250, 250) if sum(colour) < 600 else (60, 60, 60)
    d.rounded_rectangle([x0, base - 8 * s, x0 + length, base + 2 * s], radius=5 * s, fill=sole, outline=(160, 160, 160))
    heel_h = height * rng.uniform(0.9, 1.1)
    upper = [(x0 + 2 * s, base - 8 * s), (x0 + 2 * s, base - heel_h), (x0 + length * 0.35, base - heel_h * 0.95),
             (x0 + length * 0.6, base - height * 0.55), (x0 + length * 0.93, base - height * 0.35),
             (x0 + length, base - 8 * s)]
    d.polygon(upper, fill=colour, outline=tuple(max(0, c - 40) for c in colour))
    d.chord([x0 + length * 0.72, base - height * 0.45, x0 + length * 1.02, base - 2 * s], 180, 360,
            fill=tuple(min(255, c + 25) for c in colour))
    lace = (245, 245, 245) if sum(colour) < 450 else (40, 40, 40)
    for k in range(4):
        x = x0 + length * (0.38 + 0.06 * k)
        y = base - height * (0.9 - 0.1 * k)
        d.line([x - 4 * s, y - 2 * s, x + 4 * s, y + 2 * s], fill=lace, width=max(1, int(2 * s)))
    return im


def make_dataset(out: Path, n: int = 32, size: int = 128, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    captions = {}
    for i in range(n):
        colour = names[i % len(names)]
        style = STYLES[int(rng.integers(len(STYLES)))]
        file = f"shoe_{i:04d}.png"
        draw_shoe(size, COLOURS[colour], rng).save(out / "images" / file)
        captions[file] = f"A professional product photo of {colour} {style} on white background, product photography"
    (out / "captions.json").write_text(json.dumps(captions, indent=2))
    return out


def run_training(argv: list[str]) -> int:
    """`python -m train ARGV` as its own process, exactly as a user would start it.

    Ctrl-C reaches both processes; this one waits, so train.py can finish its step and checkpoint.
    """
    child = subprocess.Popen([sys.executable, "-m", "train", *argv])
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return child.wait()
    finally:
        signal.signal(signal.SIGINT, previous)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mlx-sd-demo",
                                description="Train a LoRA end to end on a built-in tiny model and dataset.")
    p.add_argument("--output_dir", default="demo_output", help="where the model, dataset and run go")
    p.add_argument("--steps", type=int, default=120, help="training steps")
    p.add_argument("--images", type=int, default=32, help="images in the procedural dataset")
    args = p.parse_args(argv)

    root = Path(args.output_dir).resolve()
    t0 = time.perf_counter()
    print(f"1/3 making a tiny SD1.5-shaped model with MLX in {root / 'tiny-model'}")
    model = make_tiny_model(root / "tiny-model")
    print(f"2/3 drawing {args.images} product photos in {root / 'dataset'}")
    data = make_dataset(root / "dataset", n=args.images)
    run = root / "run"
    if run.exists():  # a user's earlier demo run is kept, never deleted
        kept = root / f"run-{time.strftime('%Y%m%d-%H%M%S', time.localtime(run.stat().st_mtime))}"
        run.rename(kept)
        print(f"    the previous demo run is now in {kept}")
    print(f"3/3 training a LoRA for {args.steps} steps in {run}")
    every = max(1, args.steps // 2)
    rc = run_training([
        "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir", str(run),
        "--resolution", "128", "--train_batch_size", "2", "--max_train_steps", str(args.steps),
        "--learning_rate", "1e-3", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "5",
        "--checkpointing_steps", str(every), "--validation_steps", str(every),
        "--validation_prompts", "A professional product photo of black casual shoes on white background",
        "A professional product photo of blue casual sneakers on white background",
        "--num_validation_images", "2", "--validation_inference_steps", "10",
    ])
    if rc != 0:
        return rc
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s. Outputs in {run}:")
    for sub, what in (("lora_weights", "adapter in PEFT, diffusers and kohya formats"),
                      ("checkpoints", "resumable checkpoints"), ("validation", "validation images and grids"),
                      ("logs", "run config, metrics.jsonl, loss curve")):
        print(f"  {run / sub}  ({what})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
