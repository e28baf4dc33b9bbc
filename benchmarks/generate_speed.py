"""Bulk generation speed: images/min and peak memory, MLX (`StableDiffusion.stream`, as
`mlx-sd-generate` runs it) vs diffusers' StableDiffusionPipeline, per precision and image size.

SD1.5 shapes (the bundled mlx_sd/configs/sd15) with random weights (speed does not depend on the
values; each side initialises its own, so the MLX process never loads torch). Both sides: the
PNDM sampler, the same steps, guidance 7.5 (one UNet call on [uncond; cond]), the same size, one
image per batch. Each (side, dtype, size) runs in its own process after a one-step warm-up image;
images/min counts the timed images only. Peak memory: the process's peak RSS (benchmarks/rss.py), and for
MLX also MLX's own peak allocation (`mx.get_peak_memory`). On Linux these are CPU figures.

    python benchmarks/generate_speed.py --sizes 256 512 --images 2 --steps 4
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rss import peak_rss_gb  # benchmarks/rss.py (this folder is on sys.path)

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a professional product photo of black leather casual shoes, side view, white background"
DTYPES = ("float32", "float16", "bfloat16")


def mlx_worker(dtype: str, size: int, images: int, steps: int, overlap: bool) -> dict:
    import mlx_sd  # noqa: F401, I001  (the fast BLAS before mlx.core)
    import mlx.core as mx

    from mlx_sd.clip import CLIPTextModel
    from mlx_sd.config import CLIPTextConfig, SchedulerConfig, UNetConfig, VAEConfig, read_json
    from mlx_sd.configs import SD15
    from mlx_sd.pipeline import StableDiffusion
    from mlx_sd.tokenizer import Tokenizer
    from mlx_sd.unet import UNet2DConditionModel
    from mlx_sd.vae import AutoencoderKL

    mx.random.seed(0)
    models = (CLIPTextModel(CLIPTextConfig.from_diffusers(read_json(SD15 / "text_encoder" / "config.json"))),
              UNet2DConditionModel(UNetConfig.from_diffusers(read_json(SD15 / "unet" / "config.json"))),
              AutoencoderKL(VAEConfig.from_diffusers(read_json(SD15 / "vae" / "config.json"))))
    sd = StableDiffusion(Tokenizer(SD15 / "tokenizer"), *models,
                         SchedulerConfig.from_diffusers(read_json(SD15 / "scheduler" / "scheduler_config.json")),
                         dtype=dtype)
    mx.eval([m.parameters() for m in models])
    kw = {"steps": steps, "guidance_scale": 7.5, "sampler": "pndm", "height": size, "width": size, "overlap": overlap}
    list(sd.stream([([PROMPT], [0])], **{**kw, "steps": 1}))  # warm-up
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    out = list(sd.stream((([PROMPT], [i + 1]) for i in range(images)), **kw))
    dt = time.perf_counter() - t0
    assert len(out) == images
    return {"seconds": dt, "mlx_peak_gb": mx.get_peak_memory() / 1e9}


def torch_worker(dtype: str, size: int, images: int, steps: int) -> dict:
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from mlx_sd.configs import SD15

    def cfg(name):
        return json.loads((SD15 / name / "config.json").read_text())

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_config(cfg("vae")), unet=UNet2DConditionModel.from_config(cfg("unet")),
        text_encoder=CLIPTextModel(CLIPTextConfig(**cfg("text_encoder"))),
        tokenizer=CLIPTokenizer.from_pretrained(SD15 / "tokenizer"),
        scheduler=PNDMScheduler.from_config(json.loads((SD15 / "scheduler" / "scheduler_config.json").read_text())),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = pipe.to(getattr(torch, dtype))
    pipe.set_progress_bar_config(disable=True)
    kw = {"num_inference_steps": steps, "guidance_scale": 7.5, "height": size, "width": size, "output_type": "np"}
    with torch.no_grad():
        pipe(PROMPT, **{**kw, "num_inference_steps": 1}, generator=torch.Generator().manual_seed(0))  # warm-up
        t0 = time.perf_counter()
        for i in range(images):
            pipe(PROMPT, **kw, generator=torch.Generator().manual_seed(i + 1))
        dt = time.perf_counter() - t0
    return {"seconds": dt}


def run_worker(args, side: str, dtype: str, size: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, dtype, str(size), "--images", str(args.images),
           "--steps", str(args.steps)] + (["--no_overlap"] if args.no_overlap else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode or not lines:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail[:100]}
    return json.loads(lines[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sizes in pixels")
    p.add_argument("--images", type=int, default=2, help="timed images per run (one per batch)")
    p.add_argument("--steps", type=int, default=4, help="sampler steps per image")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES, help="precisions to run")
    p.add_argument("--sides", nargs="+", default=["mlx", "diffusers"], choices=["mlx", "diffusers"])
    p.add_argument("--no_overlap", action="store_true", help="MLX: decode each batch before sampling the next")
    p.add_argument("--worker", nargs=3, metavar=("SIDE", "DTYPE", "SIZE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        side, dtype, size = args.worker
        if side == "mlx":
            out = mlx_worker(dtype, int(size), args.images, args.steps, not args.no_overlap)
        else:
            out = torch_worker(dtype, int(size), args.images, args.steps)
        print(json.dumps({**out, "rss_gb": peak_rss_gb()}))
        return
    print(f"{args.images} images x {args.steps} PNDM steps, guidance 7.5, batch 1; "
          f"MLX decode overlap {'off' if args.no_overlap else 'on'}")
    print(f"{'size':>5} {'dtype':>9} {'side':>10} {'img/min':>8} {'s/img':>7} {'peak RSS GB':>12} {'MLX peak GB':>12}")
    for size in args.sizes:
        for dtype in args.dtypes:
            for side in args.sides:
                r = run_worker(args, side, dtype, size)
                if "error" in r:
                    print(f"{size:>5} {dtype:>9} {side:>10}   failed: {r['error']}", flush=True)
                    continue
                per = r["seconds"] / args.images
                mlx_peak = f"{r['mlx_peak_gb']:.2f}" if "mlx_peak_gb" in r else "-"
                print(f"{size:>5} {dtype:>9} {side:>10} {60 / per:>8.2f} {per:>7.1f} {r['rss_gb']:>12.2f} "
                      f"{mlx_peak:>12}", flush=True)


if __name__ == "__main__":
    main()
