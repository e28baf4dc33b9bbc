"""Which speed and memory choices hold on which device, decided here and nowhere else.

The CPU column was measured on a 2-core x86 CPU (MLX's CPU backend). The GPU column was measured
on MLX's CUDA backend (one NVIDIA H200, `benchmarks/gpu_proxy.py`), the stand-in for Metal on a
Mac: both run the same GPU-side machinery (command buffers, lazy graphs, mx.compile's fused
kernels, the memory limit's waits). There every CPU-only path made the 512 px training step slower
than MLX's own (table below), so a GPU, Metal included, keeps MLX's own path. `CHOICES` lists the
choices with the value each device gets and why; `mlx-sd-doctor` and `train.py` print the table.

Modules ask the functions below (`memory_budget_applies()`, `custom_conv_gradients()`, ...), never
`mx.default_device()` themselves, so each branch has one switch the tests can turn:
`MLX_SD_FORCE_GPU_BRANCHES=1` makes every choice take its GPU value while MLX still computes on
the CPU, which is how the suite runs the GPU branches on a machine without one (README, "Device choices").
Metal-only steps (reading the GPU's memory, the wired limit) ask `on_metal()`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import mlx.core as mx

FORCE_GPU_ENV = "MLX_SD_FORCE_GPU_BRANCHES"
CPU_STREAMS_ENV = "MLX_SD_CPU_STREAMS"
CPU_ATTENTION_CHUNK = 1024  # query rows in flight per large self-attention on the CPU


def forced_gpu() -> bool:
    return os.environ.get(FORCE_GPU_ENV, "").strip() not in ("", "0")


def on_gpu() -> bool:
    """True when MLX computes on a GPU, or when the GPU branches are forced for testing."""
    return forced_gpu() or mx.default_device().type == mx.gpu


def on_metal() -> bool:
    """True on Apple's Metal backend (never forced: its calls need a real Metal device)."""
    metal = getattr(mx, "metal", None)
    return bool(metal is not None and metal.is_available() and mx.default_device().type == mx.gpu)


def memory_budget_applies() -> bool:
    """Whether `--gradient_checkpointing` sets the automatic budget (`mlx_sd.memory`)."""
    return not on_gpu()


def custom_conv_gradients() -> bool:
    """Whether `mlx_sd.conv.Conv2d` takes its own 3x3 input gradients instead of MLX's."""
    return not on_gpu()


def attention_streams() -> int:
    """How many streams the attention chunks alternate over (each CPU stream is a thread)."""
    if on_gpu():
        return 1
    return max(1, int(os.environ.get(CPU_STREAMS_ENV, "0")) or min(os.cpu_count() or 1, 2))


def attention_chunk() -> int:
    """Default query chunk of large self-attentions (0: MLX's fused attention, never chunked)."""
    return 0 if on_gpu() else CPU_ATTENTION_CHUNK


def compile_sampler() -> bool:
    """Whether the sampler compiles the UNet by default (`mlx_sd.pipeline`)."""
    return on_gpu()


@dataclass(frozen=True)
class Choice:
    name: str
    cpu: str
    gpu: str
    why: str


CHOICES = (
    Choice("memory budget (with --gradient_checkpointing)", "UNet weights + 1 GB", "off (MLX's own limit)",
           "CPU: 512 px b2 peak 4.99 GB at the same speed; CUDA: peak 9.40 -> 7.66 GB at 1.19x the step time"),
    Choice("3x3 convolution gradients", "mlx_sd.conv at small maps and stride 2", "MLX's own",
           "CPU: MLX's input gradient took up to 3.2 s per conv; CUDA: the custom ones make the 512 px step "
           "1.20x slower (2.04x without checkpointing)"),
    Choice("attention chunk streams", "2 CPU streams (threads)", "the default stream",
           "CPU: MLX runs exp on one thread per stream, 2 streams ~1.5x faster; CUDA: 2 GPU streams no faster"),
    Choice("large self-attention", f"{CPU_ATTENTION_CHUNK}-row query chunks, own backward", "MLX's fused attention",
           "CPU: chunks cut the backward peak with the budget on; CUDA: 1.13x the step time for a peak "
           "9.40 -> 7.54 GB"),
    Choice("compiled sampler", "off", "on",
           "CPU: no faster, seconds of JIT; CUDA: 1.08x the images/min (float32 and float16), its first "
           "call JIT-compiles the fused kernels"),
    Choice("wired memory limit", "n/a", "Metal: the recommended working set",
           "as mlx-lm's trainer: keeps the weights resident"),
)


def current() -> str:
    """'gpu' or 'cpu': which column of `CHOICES` applies in this process."""
    return "gpu" if on_gpu() else "cpu"


def describe() -> list[str]:
    """The choices table as text lines, the applying column marked."""
    col = current()
    where = f"{mx.default_device()}" + (f" ({FORCE_GPU_ENV}=1: GPU branches forced)" if forced_gpu() else "")
    lines = [f"device choices on {where}: the {col.upper()} column applies"]
    width = max(len(c.name) for c in CHOICES)
    for c in CHOICES:
        value = c.gpu if col == "gpu" else c.cpu
        other = c.cpu if col == "gpu" else c.gpu
        lines.append(f"  {c.name:<{width}}  {value}  [{'cpu' if col == 'gpu' else 'gpu'}: {other}]  {c.why}")
    return lines


def one_line() -> str:
    """A one-line summary for the start of a training run."""
    col = current()
    values = "; ".join(f"{c.name.split(' (')[0]}: {c.gpu if col == 'gpu' else c.cpu}" for c in CHOICES[:5])
    return f"device {mx.default_device()}{' (GPU branches forced)' if forced_gpu() else ''}: {values}"
