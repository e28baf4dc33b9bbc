"""Memory: the scheduler budget, what the machine has, and whether a run fits. Units: GB = 1e9 bytes.

MLX evaluates a graph asynchronously: the thread that walks the graph allocates each result and
hands the work to the device's queue, so it can run far ahead of the computation, and buffers
that are already dead are only returned once the queued work that uses them has run. A
training step's peak therefore depends on how far the scheduler ran ahead, not only on the
graph. `mx.set_memory_limit` is the knob: above the limit, evaluation waits for queued work to
finish (and free its inputs) before it schedules more. It is a guideline, never an error.

On the CPU, with gradient checkpointing, train.py sets the budget to the UNet's weights plus
`CHECKPOINTING_HEADROOM_GB`; measured at 512 px batch 2 (float32) this holds the peak to about
5.0 GB at the same step time (benchmarks/train_step.py). A budget far below what a step keeps
alive anyway makes evaluation wait after nearly every operation and costs time (a 256 px step
with a 1 GB budget ran 1.7x slower). On a GPU there is no automatic budget
(`mlx_sd.device.memory_budget_applies`): the measured peaks are above it, and there waiting
serialises the command queue and Metal reclaims its buffer cache above the limit (unmeasured).

`machine_memory()` reads what the machine has (Metal: the GPU's recommended working set; Linux:
/proc/meminfo; elsewhere sysconf), `fit_report()` compares a run's measured peak with it, and
`set_wired_limit()` keeps the weights resident on Metal as mlx-lm's trainer does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten

from . import device

CHECKPOINTING_HEADROOM_GB = 1.0
TIGHT_FRACTION = 0.85  # above this share of the usable memory the OS starts to swap or compress


def weights_gb(model: nn.Module) -> float:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 1e9


def auto_budget_gb(model: nn.Module, gradient_checkpointing: bool) -> float | None:
    """The budget train.py uses when none is given: weights + headroom with checkpointing, on the
    CPU only (None: MLX's own limit)."""
    if not gradient_checkpointing or not device.memory_budget_applies():
        return None
    return weights_gb(model) + CHECKPOINTING_HEADROOM_GB


def current_limit() -> int:
    """MLX's memory limit in bytes, as it stands now."""
    return mx.get_memory_limit()


def set_budget(gb: float | None) -> int:
    """Set the limit to `gb` GB; None or 0 leaves it as it is. Returns the limit before (bytes)."""
    if gb is None or gb <= 0:
        return current_limit()
    return mx.set_memory_limit(int(gb * 1e9))


@dataclass(frozen=True)
class MachineMemory:
    total_gb: float
    usable_gb: float  # what one process can expect to use: GPU working set on Metal, available RAM elsewhere
    source: str


def _meminfo(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0]) * 1024 / 1e9  # /proc/meminfo counts kB (KiB)
    return out


def machine_memory() -> MachineMemory:
    if device.on_metal():
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        total = info["memory_size"] / 1e9
        usable = info.get("max_recommended_working_set_size", info["memory_size"]) / 1e9
        return MachineMemory(total, usable, "Metal recommended working set")
    try:
        with open("/proc/meminfo") as f:
            info = _meminfo(f.read())
        return MachineMemory(info["MemTotal"], info.get("MemAvailable", info["MemTotal"]), "/proc/meminfo available")
    except (OSError, KeyError):
        pass
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
        return MachineMemory(total, total, "sysconf physical memory")
    except (ValueError, OSError, AttributeError):
        return MachineMemory(0.0, 0.0, "unknown")


def set_wired_limit() -> int | None:
    """On Metal, wire up to the recommended working set so the weights are not paged out between
    steps (mlx-lm's trainer does the same); returns the previous wired limit, None elsewhere."""
    if not device.on_metal():
        return None
    info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    return mx.set_wired_limit(int(info["max_recommended_working_set_size"]))


def fit_report(train_peak_gb: float, validation_peak_gb: float | None, machine: MachineMemory, *,
               batch: int, checkpointing: bool, base_dtype: str) -> tuple[bool, list[str]]:
    """Whether the run's peak fits the machine, and what to change when it does not.
    Returns (fits, lines)."""
    need = max(train_peak_gb, validation_peak_gb or 0.0)
    val = f", validation {validation_peak_gb:.2f} GB" if validation_peak_gb is not None else ""
    lines = [(f"memory: training peak {train_peak_gb:.2f} GB{val}; this machine: {machine.usable_gb:.1f} GB usable "
              f"of {machine.total_gb:.1f} GB ({machine.source})")]
    if machine.usable_gb <= 0:
        lines.append("memory: could not read this machine's memory; compare the peak above with it yourself")
        return True, lines
    share = need / machine.usable_gb
    if share <= TIGHT_FRACTION:
        lines.append(f"memory: fits ({100 * share:.0f}% of the usable memory)")
        return True, lines
    lines.append(f"memory: {'does not fit' if share > 1 else 'tight'} ({100 * share:.0f}% of the usable memory); "
                 "to lower the peak:")
    if not checkpointing:
        lines.append("  --gradient_checkpointing (recomputes activations: much less memory, ~10-40% more time)")
    if batch > 1:
        lines.append(f"  --train_batch_size {max(1, batch // 2)} with --gradient_accumulation_steps doubled "
                     "(same images per update)")
    if base_dtype == "float32":
        lines.append("  --base_dtype bfloat16 (frozen UNet in bfloat16: ~40% less; emulated, slower on M1/M2)")
    if validation_peak_gb is not None and validation_peak_gb >= train_peak_gb:
        lines.append("  fewer --num_validation_images, or --no_validation (validation sets the peak)")
    lines.append("  or close other apps: the usable memory above is what was free when this ran")
    return share <= 1, lines
