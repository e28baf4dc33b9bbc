"""A memory budget for MLX's scheduler.

MLX evaluates a graph asynchronously: the thread that walks the graph allocates each result and
hands the work to the device's queue, so it can run far ahead of the computation, and buffers
that are already dead are only returned once the queued work that uses them has run. A
training step's peak therefore depends on how far the scheduler ran ahead, not only on the
graph. `mx.set_memory_limit` is the knob: above the limit, evaluation waits for queued work to
finish (and free its inputs) before it schedules more. It is a guideline, never an error.

With gradient checkpointing (the memory-saving mode) train.py sets the budget to the UNet's
weights plus `CHECKPOINTING_HEADROOM_GB`; measured at 512 px batch 2 (float32) this holds the
peak to about 4.9 GB at the same step time (benchmarks/train_step.py). A budget far below what
a step keeps alive anyway makes evaluation wait after nearly every operation and costs time
(a 256 px step with a 1 GB budget ran 1.7x slower).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

CHECKPOINTING_HEADROOM_GB = 1.0


def weights_gb(model: nn.Module) -> float:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 1e9


def auto_budget_gb(model: nn.Module, gradient_checkpointing: bool) -> float | None:
    """The budget train.py uses when none is given: weights + headroom with checkpointing."""
    return weights_gb(model) + CHECKPOINTING_HEADROOM_GB if gradient_checkpointing else None


def set_budget(gb: float | None) -> int:
    """Apply a budget in GB (None or 0: leave MLX's default); returns the previous limit."""
    if gb is None or gb <= 0:
        previous = mx.set_memory_limit(0)
        mx.set_memory_limit(previous)
        return previous
    return mx.set_memory_limit(int(gb * 1e9))
