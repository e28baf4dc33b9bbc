"""Whole training runs: `train.py` (cached latents and text) vs the original script's way.

Same model, data and shape on both sides: an SD1.5-shaped pipeline with random (seeded) weights
written once as a diffusers folder and converted for MLX, a procedural product-photo dataset
(`mlx_sd.demo`), batch 2, LoRA r=8 alpha=16, AdamW, gradient checkpointing, float32, no
validation or checkpoints. Three runs, each its own process:

- `train.py`: encodes every image and caption once into `output_dir/cache`, frees the VAE and
  text encoder, then trains on cached latents (the product's default);
- `train.py --no_cache`: VAE and text encoder run every step, in MLX;
- the original script's way: diffusers + peft in torch, VAE encode and CLIP every step.

Printed per run: whole-process wall time (start-up, loading, caching, compilation and all
steps), median s/step over the steps after the first, the time outside the steps, and the
peak RSS of the process. `--images` controls how much caching costs up front; the per-step
saving repays it after the number of steps printed as the break-even.

    python benchmarks/whole_process.py --resolution 256 --steps 6 --images 8
"""

import mlx_sd  # noqa: F401,I001  (first: puts the fast BLAS under MLX before mlx.core loads)

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MAKE_MODEL = r"""
import json, sys
from pathlib import Path
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
sys.path.insert(0, sys.argv[2])
from mlx_sd.configs import SD15
out = Path(sys.argv[1])
torch.manual_seed(0)
read = lambda *p: json.loads(SD15.joinpath(*p).read_text())
unet = UNet2DConditionModel.from_config(read("unet", "config.json"))
vae = AutoencoderKL.from_config(read("vae", "config.json"))
text = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in read("text_encoder", "config.json").items()
                                      if k not in ("architectures", "_name_or_path")}))
pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(SD15 / "tokenizer"),
                               unet=unet, scheduler=DDPMScheduler.from_config(read("scheduler",
                                                                                   "scheduler_config.json")),
                               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
pipe.save_pretrained(out, safe_serialization=True)
"""

# The diffusers + PEFT trainer's way (the README's "Speed" section): VAE encode -> latent sample and CLIP text
# embeddings every step, then benchmarks/torch_reference.py's LoRA step.
TORCH_RUN = r"""
import json, statistics, sys, time
t_start = time.perf_counter()
from pathlib import Path
import numpy as np
import torch
from PIL import Image
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer
from benchmarks.torch_reference import add_lora, train_step
model, data = Path(sys.argv[1]), Path(sys.argv[2])
size, batch, steps = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(42)
tokenizer = CLIPTokenizer.from_pretrained(model / "tokenizer")
text_encoder = CLIPTextModel.from_pretrained(model / "text_encoder").requires_grad_(False)
vae = AutoencoderKL.from_pretrained(model / "vae").requires_grad_(False)
unet = UNet2DConditionModel.from_pretrained(model / "unet")
sched = DDPMScheduler.from_pretrained(model / "scheduler")
params, opt = add_lora(unet, gradient_checkpointing=True)
captions = json.loads((data / "captions.json").read_text())
files = sorted(captions)

def load(name):
    im = Image.open(data / "images" / name).convert("RGB").resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0)

times = []
for step in range(steps):
    t = time.perf_counter()
    names = [files[(step * batch + i) % len(files)] for i in range(batch)]
    pixels = torch.stack([load(n) for n in names])
    ids = tokenizer([captions[n] for n in names], padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        ctx = text_encoder(ids)[0]
    train_step(unet, sched, params, opt, latents, ctx)
    times.append(time.perf_counter() - t)
print(json.dumps({"step_times": times, "wall_in_process": time.perf_counter() - t_start}))
"""

# Runs a command and reports its peak RSS (the only child of this process).
MEASURE = r"""
import json, subprocess, sys, time
from benchmarks.rss import peak_rss_gb
t = time.perf_counter()
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"rc": r.returncode, "wall": time.perf_counter() - t,
                  "rss_gb": peak_rss_gb(children=True),
                  "stdout": r.stdout[-4000:], "stderr": r.stderr[-4000:]}))
"""


def measured(cmd: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, cwd=ROOT, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed:\n{result['stderr'][-2000:]}")
    return result


def mlx_run(model: Path, data: Path, out: Path, args, no_cache: bool) -> dict:
    cmd = [sys.executable, str(ROOT / "train.py"), "--pretrained_model_name_or_path", str(model),
           "--train_data_dir", str(data), "--output_dir", str(out), "--resolution", str(args.resolution),
           "--train_batch_size", str(args.batch), "--gradient_accumulation_steps", "1",
           "--max_train_steps", str(args.steps), "--gradient_checkpointing", "--checkpointing_steps", "0",
           "--no_validation", "--no_progress", "--lr_scheduler", "constant", "--lr_warmup_steps", "0"]
    r = measured(cmd + (["--no_cache"] if no_cache else []))
    metrics = [json.loads(line) for run in sorted((out / "logs").iterdir())
               for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    r["step_times"] = [m["s_per_step"] for m in metrics if "s_per_step" in m]
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=256, help="image size in px")
    p.add_argument("--steps", type=int, default=6, help="training steps per run")
    p.add_argument("--images", type=int, default=8, help="images in the dataset")
    p.add_argument("--batch", type=int, default=2, help="images per step")
    p.add_argument("--workdir", default=None, help="keep the model and dataset here (default: a temporary folder)")
    p.add_argument("--skip", nargs="*", default=[], choices=["cached", "no_cache", "torch"], help="runs to leave out")
    args = p.parse_args()

    from mlx_sd import blas
    from mlx_sd.demo import make_dataset

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mlx-sd-whole-"))
    diffusers_dir, mlx_dir, data = work / "sd15-random-diffusers", work / "sd15-random-mlx", work / "data"
    try:
        if not (diffusers_dir / "model_index.json").exists():
            print(f"writing an SD1.5-shaped random pipeline to {diffusers_dir} ...", flush=True)
            subprocess.run([sys.executable, "-c", MAKE_MODEL, str(diffusers_dir), str(ROOT)], check=True, cwd=ROOT)
        if not (mlx_dir / "mlx_sd.json").exists():
            subprocess.run([sys.executable, "-m", "convert", str(diffusers_dir), str(mlx_dir)], check=True, cwd=ROOT,
                           stdout=subprocess.DEVNULL)
        captions = data / "captions.json"
        if not captions.exists() or len(json.loads(captions.read_text())) != args.images:
            shutil.rmtree(data, ignore_errors=True)
            make_dataset(data, n=args.images, size=args.resolution)

        runs = {}
        for name in ("cached", "no_cache", "torch"):
            if name in args.skip:
                continue
            print(f"running {name} ...", flush=True)
            if name == "torch":
                r = measured([sys.executable, "-c", TORCH_RUN, str(diffusers_dir), str(data), str(args.resolution),
                              str(args.batch), str(args.steps)])
                r.update(json.loads(r["stdout"].strip().splitlines()[-1]))
            else:
                out = work / f"run-{name}"
                shutil.rmtree(out, ignore_errors=True)
                r = mlx_run(mlx_dir, data, out, args, no_cache=name == "no_cache")
            runs[name] = r
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    import mlx.core as mx
    import torch

    print(f"\nMLX {mx.__version__} {mx.default_device()}, {blas.status().describe()}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{args.resolution} px, batch {args.batch}, {args.steps} steps, {args.images} images, "
          "gradient checkpointing, float32")
    labels = {"cached": "train.py (cached)", "no_cache": "train.py --no_cache",
              "torch": "diffusers+peft, encode every step"}
    print(f"{'run':<36}{'wall s':>9}{'s/step':>9}{'outside steps s':>17}{'peak RSS':>10}")
    for name, r in runs.items():
        steady = statistics.median(r["step_times"][1:] or r["step_times"])
        outside = r["wall"] - sum(r["step_times"])
        r["steady"], r["outside"] = steady, outside
        print(f"{labels[name]:<36}{r['wall']:>9.1f}{steady:>9.2f}{outside:>17.1f}{r['rss_gb']:>8.2f} GB")
    if "cached" in runs and "torch" in runs:
        c, t = runs["cached"], runs["torch"]
        print(f"s/step ratio train.py (cached) / original way: {c['steady'] / t['steady']:.2f}x")
        if t["steady"] > c["steady"]:
            steps = max(0.0, (c["outside"] - t["outside"]) / (t["steady"] - c["steady"]))
            print(f"train.py's whole run is shorter after ~{steps:.0f} steps at this dataset size")
        else:
            print("train.py's step is slower than the original way's here, so caching never repays on this machine")


if __name__ == "__main__":
    main()
