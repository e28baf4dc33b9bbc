"""One LoRA training step, MLX vs diffusers+peft, side by side (SD1.5 UNet shape, float32).

Both sides: the real SD1.5 UNet config with random weights, LoRA r=8 alpha=16 on
to_q/to_k/to_v/to_out.0 (1,594,368 trainable parameters), AdamW, MSE on epsilon with DDPM
noise at uniform timesteps, 77x768 text embeddings. MLX runs the product's compiled step
(`mlx_sd.training.TrainStep`); torch runs the same step the original PyTorch script does.
Each (framework, shape) runs in a fresh process so peak RSS is its own; the two frameworks
alternate shape by shape. Reported: median s/step over the timed steps after warm-up, MLX's
allocator peak, process peak RSS, the ratio MLX/torch, and the loss of one step on a fixed
batch and draw (the same for every `--base_dtype`, so low-precision bases can be compared).
MLX runs on its default device (Metal on a Mac, the CPU on Linux); torch on `--torch_device`
(auto: MPS where available, else the CPU), so on a Mac it is MLX on Metal against torch on MPS.
On MPS torch has no peak counter: its column is the largest `torch.mps.driver_allocated_memory()`
seen after a step. `python benchmarks/mac_report.py` wraps this in a report to paste into an issue.

    python benchmarks/train_step.py                      # 256 and 512 px, batch 1
    python benchmarks/train_step.py --sizes 256 --batches 1 2 --checkpointing both
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MLX_WORKER = r"""
import mlx_sd, json, statistics, sys, time
import mlx.core as mx
from benchmarks.rss import peak_rss_gb
from mlx_sd import blas
from mlx_sd.config import UNetConfig, read_json
from mlx_sd.configs import SD15
from mlx_sd.unet import UNet2DConditionModel
from mlx_sd.schedulers import NoiseSchedule
from mlx_sd.training import LossConfig, TrainStep, make_optimizer, sample_keys
from lora import LoRAConfig, inject_lora, trainable_count
size, batch, ckpt, warmup, steps = map(int, sys.argv[1:6])
base_dtype, memory_limit = sys.argv[6], sys.argv[7]
from mlx_sd import memory
mx.random.seed(0)
config = UNetConfig.from_diffusers(read_json(SD15 / "unet" / "config.json"))
unet = UNet2DConditionModel(config, gradient_checkpointing=bool(ckpt))
unet.set_dtype(getattr(mx, base_dtype))
inject_lora(unet, LoRAConfig(r=8, alpha=16))
mx.eval(unet.parameters())
budget = memory.auto_budget_gb(unet, bool(ckpt)) if memory_limit == "auto" else float(memory_limit)
memory.set_budget(budget)  # as train.py does
schedule = NoiseSchedule(read_json(SD15 / "scheduler" / "scheduler_config.json"))
step = TrainStep(unet, make_optimizer(1e-4, "constant", 0, 100), schedule, LossConfig())
h = size // 8
mean, std = mx.random.normal((batch, h, h, 4)), mx.full((batch, h, h, 4), 0.1)
ctx = mx.random.normal((batch, 77, 768))
keys = mx.array(sample_keys(1, 0, range(batch)))  # the same draws for every base dtype
mx.eval(mean, std, ctx)
t0 = time.perf_counter()
first, first_grads = step.grad_step(mean, std, ctx, keys, step.zero_grads())
mx.eval(first, first_grads)  # includes compilation
first_loss = first.item()
compile_s = time.perf_counter() - t0
mx.reset_peak_memory()
times = []
for i in range(warmup + steps):
    t = time.perf_counter()
    loss, acc = step.grad_step(mean, std, ctx, keys, step.zero_grads())
    norm = step.apply_update(acc)
    mx.eval(loss, norm, unet.trainable_parameters(), step.optimizer.state)
    times.append(time.perf_counter() - t)
print(json.dumps({"s_step": statistics.median(times[warmup:]), "first_s": compile_s, "loss": first_loss,
                  "peak_gb": mx.get_peak_memory() / 1e9, "rss_gb": peak_rss_gb(),
                  "trainable": trainable_count(unet), "budget_gb": budget,
                  "backend": f"MLX {mx.__version__} {mx.default_device()}, {blas.status().describe()}"}))
"""

TORCH_WORKER = r"""
import json, statistics, sys, time
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
sys.path.insert(0, sys.argv[9])
from benchmarks.rss import peak_rss_gb
from benchmarks.torch_reference import add_lora, train_step
from mlx_sd.configs import SD15
size, batch, ckpt, warmup, steps = map(int, sys.argv[1:6])
dev = sys.argv[8]
if dev == "auto":
    dev = "mps" if torch.backends.mps.is_available() else "cpu"
sync = torch.mps.synchronize if dev == "mps" else (lambda: None)
torch.manual_seed(0)
unet = UNet2DConditionModel.from_config(json.loads((SD15 / "unet" / "config.json").read_text()))
params, opt = add_lora(unet, bool(ckpt))
unet.to(dev)  # in place: the optimizer's parameters move too (its state is made at the first step)
sched = DDPMScheduler.from_config(json.loads((SD15 / "scheduler" / "scheduler_config.json").read_text()))
h = size // 8
latents, ctx = torch.randn(batch, 4, h, h).to(dev), torch.randn(batch, 77, 768).to(dev)
times, mps_gb = [], 0.0
for i in range(warmup + steps):
    t = time.perf_counter()
    loss = train_step(unet, sched, params, opt, latents, ctx)
    sync()
    times.append(time.perf_counter() - t)
    if dev == "mps":
        mps_gb = max(mps_gb, torch.mps.driver_allocated_memory() / 1e9)
threads = f"{torch.get_num_threads()} threads" if dev == "cpu" else dev.upper()
print(json.dumps({"s_step": statistics.median(times[warmup:]), "first_s": times[0], "loss": loss.item(),
                  "peak_gb": mps_gb if dev == "mps" else None, "rss_gb": peak_rss_gb(),
                  "trainable": sum(p.numel() for p in params), "device": dev,
                  "backend": f"torch {torch.__version__}, {threads}"}))
"""


def run(code: str, *args) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *map(str, args), str(ROOT)], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)}
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt(v, unit=""):
    return "n/a" if v is None else f"{v:.2f}{unit}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sizes in px")
    p.add_argument("--batches", type=int, nargs="+", default=[1], help="batch sizes")
    p.add_argument("--checkpointing", choices=["off", "on", "both"], default="off", help="gradient checkpointing")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps (MLX compiles in the first)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--only", choices=["mlx", "torch"], help="run one side only")
    p.add_argument("--base_dtype", default="float32", choices=["float32", "bfloat16"],
                   help="MLX frozen-UNet dtype (LoRA, optimizer, loss stay float32; torch side stays float32)")
    p.add_argument("--memory_limit_gb", default="auto",
                   help="MLX scheduler memory budget: 'auto' (train.py's default: weights + 1 GB with checkpointing), "
                        "a number of GB, or 0 for MLX's own")
    p.add_argument("--torch_device", default="auto", choices=["auto", "cpu", "mps"],
                   help="torch reference device (auto: MPS where available, else the CPU)")
    return p


def measure(args) -> list:
    """Runs every shape on both sides; returns (size, batch, checkpointing, MLX result, torch result) rows."""
    ckpts = {"off": [0], "on": [1], "both": [0, 1]}[args.checkpointing]
    rows = []
    for size in args.sizes:
        for batch in args.batches:
            for ck in ckpts:
                shape = (size, batch, ck, args.warmup, args.steps, args.base_dtype, args.memory_limit_gb,
                         args.torch_device)
                m = run(MLX_WORKER, *shape) if args.only != "torch" else {"error": "skipped"}
                t = run(TORCH_WORKER, *shape) if args.only != "mlx" else {"error": "skipped"}
                rows.append((size, batch, ck, m, t))
                print(f"{size}px b{batch} ckpt={'on' if ck else 'off'}: MLX {json.dumps(m)}\n"
                      f"{'':>20} torch {json.dumps(t)}", flush=True)
    return rows


def table(rows, base_dtype: str = "float32") -> list[str]:
    """The side-by-side table as text lines (Markdown-compatible)."""
    backends = {r[side].get("backend") for r in rows for side in (3, 4) if "backend" in r[side]}
    lines = ["; ".join(sorted(b for b in backends if b)),
             "| shape | MLX s/step | torch s/step | ratio | MLX peak | MLX RSS | torch peak (MPS) | torch RSS |",
             "|---|---|---|---|---|---|---|---|"]
    for size, batch, ck, m, t in rows:
        ratio = m["s_step"] / t["s_step"] if "s_step" in m and "s_step" in t else None
        label = f"{size}px b{batch} ckpt {'on' if ck else 'off'}" + ("" if base_dtype == "float32" else
                                                                      f" {base_dtype}")
        lines.append(f"| {label} | {fmt(m.get('s_step'))} | {fmt(t.get('s_step'))} | {fmt(ratio, 'x')} | "
                     f"{fmt(m.get('peak_gb'), ' GB')} | {fmt(m.get('rss_gb'), ' GB')} | "
                     f"{fmt(t.get('peak_gb'), ' GB')} | "
                     f"{fmt(t.get('rss_gb'), ' GB')} |")
        for side, r in (("MLX", m), ("torch", t)):
            if "error" in r and r["error"] != "skipped":
                lines.append(f"    {side} failed: {r['error']}")
    return lines


def main() -> None:
    args = parser().parse_args()
    rows = measure(args)
    print("\n" + "\n".join(table(rows, args.base_dtype)))


if __name__ == "__main__":
    main()
