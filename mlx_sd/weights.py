"""Strict weight loading: every missing, unexpected or mis-shaped key is reported at once."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten


class WeightsError(ValueError):
    pass


def check_weights(model: nn.Module, weights: dict[str, mx.array], source: str = "weights") -> None:
    """Raise WeightsError listing all key/shape mismatches between `model` and `weights`."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = sorted(
        f"{k}: file {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(weights)
        if tuple(weights[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or shapes:
        lines = [f"{source} does not match {type(model).__name__}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines += [f"    {k}" for k in items[:50]]
                if len(items) > 50:
                    lines.append(f"    ... and {len(items) - 50} more")
        lines.append("Is this the right model for this config? Re-run `python -m convert` on the source.")
        raise WeightsError("\n".join(lines))


def load_strict(model: nn.Module, weights: dict[str, mx.array] | str | Path, source: str | None = None) -> nn.Module:
    """Load `weights` (a dict or a .safetensors path) into `model` after a strict check."""
    if not isinstance(weights, dict):
        source = source or str(weights)
        weights = mx.load(str(weights))
    check_weights(model, weights, source or "weights")
    dtype_fixed = {}
    expected = dict(tree_flatten(model.parameters()))
    for k, v in weights.items():
        dtype_fixed[k] = v.astype(expected[k].dtype) if v.dtype != expected[k].dtype else v
    model.load_weights(list(dtype_fixed.items()), strict=True)
    return model


def set_by_path(tree, dotted: str, value) -> None:
    """`tree[a][0][b] = value` for `dotted="a.0.b"`, over modules, dicts and lists, in place."""
    *parents, last = dotted.split(".")
    node = tree
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    node[int(last) if isinstance(node, list) else last] = value
