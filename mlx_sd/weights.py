"""Strict weight loading: every missing, unexpected or mis-shaped key is reported at once."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import MlxSdError


class WeightsError(MlxSdError, ValueError):
    pass


def mismatch_report(expected: dict[str, tuple], found: dict[str, tuple], header: str, hint: str,
                    same_shape=None) -> str | None:
    """One message listing every missing, unexpected and mis-shaped key; None when all match."""
    same = same_shape or (lambda a, b: a == b)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [f"{k}: file {found[k]} vs model {expected[k]}"
              for k in sorted(set(expected) & set(found)) if not same(found[k], expected[k])]
    if not (missing or unexpected or shapes):
        return None
    lines = [header]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if items:
            lines.append(f"  {len(items)} {title}:")
            lines += [f"    {k}" for k in items[:50]]
            if len(items) > 50:
                lines.append(f"    ... and {len(items) - 50} more")
    lines.append(hint)
    return "\n".join(lines)


def check_weights(model: nn.Module, weights: dict[str, mx.array], source: str = "weights") -> None:
    """Raise WeightsError listing all key/shape mismatches between `model` and `weights`."""
    msg = mismatch_report({k: tuple(v.shape) for k, v in tree_flatten(model.parameters())},
                          {k: tuple(v.shape) for k, v in weights.items()},
                          f"{source} does not match {type(model).__name__}:",
                          "Is this the right model for this config? Re-run `python -m convert` on the source.")
    if msg:
        raise WeightsError(msg)


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
