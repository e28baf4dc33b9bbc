"""The compiled train step over alternating bucket shapes vs one square shape, side by side.

With --enable_bucket, `mlx_sd.training.TrainStep`'s compiled `grad_step` meets a new input shape
for every bucket: MLX traces and compiles it once per shape and keeps each compiled graph. This
measures what that costs: each mode runs in a fresh process the same number of micro-batches
(batch `--batch`, an update every `--accum`), "buckets" cycling through the bucket table of
`--resolution` (kohya's rules, `mlx_sd.buckets.bucket_sizes`) in a shuffled order per pass,
"square" at `--resolution` only (the run without buckets: the reference). Printed per mode: the
first micro-batch of each shape (trace + compile + run), the median of the later ones per shape,
and MLX's active and cache memory and the process RSS after each pass, so a leak shows as growth
from pass to pass. The UNet is SD1.5's real config with random weights (`--config sd15`) or the
test fixture's tiny one (`--config tiny`), LoRA r=8 on the attention projections, float32.

    python benchmarks/bucket_shapes.py --config sd15 --resolution 128 --passes 12
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORKER = r"""
import mlx_sd, json, statistics, sys, time
import mlx.core as mx
import numpy as np
from benchmarks.rss import peak_rss_gb
from mlx_sd import blas, memory
from mlx_sd.buckets import bucket_sizes
from mlx_sd.config import UNetConfig, read_json
from mlx_sd.configs import SD15
from mlx_sd.unet import UNet2DConditionModel
from mlx_sd.schedulers import NoiseSchedule
from mlx_sd.training import LossConfig, TrainStep, make_optimizer, sample_keys
from lora import LoRAConfig, inject_lora
mode, config_name, res, lo, hi, passes, batch, accum = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:9])

def rss_now_gb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 1e9

raw = read_json(SD15 / "unet" / "config.json")
if config_name == "tiny":
    sys.path.insert(0, "tests")
    from fixtures import TINY_UNET
    raw = {**raw, **TINY_UNET}
config = UNetConfig.from_diffusers(raw)
mx.random.seed(0)
unet = UNet2DConditionModel(config)
inject_lora(unet, LoRAConfig(r=8, alpha=16))
mx.eval(unet.parameters())
schedule = NoiseSchedule(read_json(SD15 / "scheduler" / "scheduler_config.json"))
step = TrainStep(unet, make_optimizer(1e-4, "constant", 0, 10**6), schedule, LossConfig(), grad_accum=accum)
table = bucket_sizes(res, lo, hi, 64) if mode == "buckets" else [(res, res)]
rng = np.random.default_rng(0)
order = [table[k] for _ in range(passes) for k in rng.permutation(len(table))]
if mode == "square":
    order = [(res, res)] * (passes * len(bucket_sizes(res, lo, hi, 64)))  # as many micro-batches
ctx = mx.random.normal((batch, 77, config.cross_attention_dim))
times, per_pass = {}, []
acc = step.zero_grads()
n_per_pass = len(order) // passes
for c, (w, h) in enumerate(order):
    mean, std = mx.random.normal((batch, h // 8, w // 8, 4)), mx.full((batch, h // 8, w // 8, 4), 0.1)
    mx.eval(mean, std)
    t = time.perf_counter()
    keys = mx.array(sample_keys(0, c // accum, (c % accum) * batch + np.arange(batch)))
    loss, acc = step.grad_step(mean, std, ctx, keys, acc)
    mx.eval(loss, acc)
    if (c + 1) % accum == 0:
        norm = step.apply_update(acc)
        mx.eval(norm, unet.trainable_parameters(), step.optimizer.state)
        acc = step.zero_grads()
    dt = time.perf_counter() - t
    key = f"{w}x{h}"
    if key in times:
        times[key]["later"].append(dt)
    else:
        times[key] = {"first": dt, "later": []}
    if (c + 1) % n_per_pass == 0:
        per_pass.append({"active_gb": mx.get_active_memory() / 1e9, "cache_gb": mx.get_cache_memory() / 1e9,
                         "rss_gb": rss_now_gb()})
        print(f"{mode} pass {len(per_pass)}: {json.dumps(per_pass[-1])}", file=sys.stderr, flush=True)
print(json.dumps({"shapes": {k: {"first_s": v["first"], "median_s": statistics.median(v["later"]) if v["later"]
                                 else None, "n": 1 + len(v["later"])} for k, v in times.items()},
                  "per_pass": per_pass, "peak_gb": mx.get_peak_memory() / 1e9, "peak_rss_gb": peak_rss_gb(),
                  "backend": f"MLX {mx.__version__} {mx.default_device()}, {blas.status().describe()}"}))
"""


def run(*args) -> dict:
    # stderr passes through: one line per pass shows progress (and what was measured if the run is cut short).
    out = subprocess.run([sys.executable, "-c", WORKER, *map(str, args)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        return {"error": f"the worker exited with {out.returncode} (its messages are above)"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=["sd15", "tiny"], default="sd15", help="UNet config (random weights)")
    p.add_argument("--resolution", type=int, default=128, help="bucket area = resolution^2 pixels")
    p.add_argument("--min_bucket_reso", type=int, default=64)
    p.add_argument("--max_bucket_reso", type=int, default=256)
    p.add_argument("--passes", type=int, default=12, help="passes over the bucket table (each shape once per pass)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--accum", type=int, default=2, help="micro-batches per update")
    a = p.parse_args()
    args = (a.config, a.resolution, a.min_bucket_reso, a.max_bucket_reso, a.passes, a.batch, a.accum)
    results = {mode: run(mode, *args) for mode in ("buckets", "square")}
    print(f"UNet {a.config}, LoRA r=8, float32, batch {a.batch}, accumulation {a.accum}, {a.passes} passes; "
          f"{results['buckets'].get('backend', '')}")
    for mode, r in results.items():
        if "error" in r:
            print(f"{mode}: failed: {r['error']}")
            continue
        print(f"\n{mode}: {sum(s['n'] for s in r['shapes'].values())} micro-batches; MLX peak {r['peak_gb']:.2f} GB, "
              f"peak RSS {r['peak_rss_gb']:.2f} GB")
        print(f"  {'shape (w x h)':>14} {'first (s)':>10} {'later median (s)':>17} {'count':>6}")
        for k, s in r["shapes"].items():
            later = f"{s['median_s']:.3f}" if s["median_s"] is not None else "-"
            print(f"  {k:>14} {s['first_s']:>10.2f} {later:>17} {s['n']:>6}")
        print("  after each pass: active GB / cache GB / RSS GB")
        print("  " + "  ".join(f"{m['active_gb']:.2f}/{m['cache_gb']:.2f}/{m['rss_gb']:.2f}" for m in r["per_pass"]))
        pp = r["per_pass"]
        if len(pp) >= 3:
            print(f"  growth from pass 2 to pass {len(pp)}: active {pp[-1]['active_gb'] - pp[1]['active_gb']:+.3f} GB, "
                  f"RSS {pp[-1]['rss_gb'] - pp[1]['rss_gb']:+.3f} GB")
    b, s = results["buckets"], results["square"]
    if "error" not in b and "error" not in s:
        def steady(r):  # mean s per micro-batch over the later visits (first visits compile)
            return sum(v["median_s"] * (v["n"] - 1) for v in r["shapes"].values() if v["median_s"]) / \
                sum(v["n"] - 1 for v in r["shapes"].values())
        print(f"\nsteady micro-batch time: buckets {steady(b):.3f} s, square {steady(s):.3f} s "
              f"(ratio {steady(b) / steady(s):.2f}; bucket areas are <= the square's)")
        print(f"compile (first visits): buckets {sum(v['first_s'] for v in b['shapes'].values()):.1f} s over "
              f"{len(b['shapes'])} shapes, square {s['shapes'][next(iter(s['shapes']))]['first_s']:.1f} s")


if __name__ == "__main__":
    main()
