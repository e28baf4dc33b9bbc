"""LoRA layers and injection by module path.

`y = W x + b + (alpha / r) * B(A(dropout(x)))` with A: (r, in), B: (out, r) as PEFT stores them
(`lora_A.weight`, `lora_B.weight`). Attribute names follow PEFT (`base_layer`, `lora_A`,
`lora_B`), so the parameter paths of an injected UNet are PEFT's paths with the adapter name
dropped, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`; in the
CLIP text encoder (`text_encoder_predicate`), e.g. `text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight`.

Dropout masks in training are keyed, not drawn from MLX's global generator: inside `dropout_keys(model,
keys)` (the train step wraps its loss in it) the mask of sample i in the model's l-th LoRA layer (sorted
by path) is `bernoulli(1 - p, x.shape[1:], key=keys[i, l])`. So the backward pass of a gradient-checkpointed
block, which runs the block again, multiplies by the masks the forward pass used, and a sample's masks
do not depend on which batch, process or accumulation step it is in. Without keys (a layer used on its
own) `nn.Dropout` draws from the global generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from contextlib import contextmanager
from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_sd.weights import set_by_path

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# CLIP's attention projections (the default, as diffusers' and kohya's scripts) and its MLP.
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
TEXT_ENCODER_ALLOWED = TEXT_ENCODER_TARGETS + ("fc1", "fc2")


@dataclass(frozen=True)
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    init: str = "gaussian"  # PEFT's names: "gaussian" (A ~ N(0, 1/r)) or "kaiming" (PEFT's default True)

    def __post_init__(self):
        if self.r <= 0:
            raise ValueError(f"LoRA rank must be positive, got r={self.r}")
        if self.init not in ("gaussian", "kaiming"):
            raise ValueError(f"LoRA init {self.init!r}: expected 'gaussian' or 'kaiming'")

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets),
                "init": self.init}


class LoRALinear(nn.Module):
    @staticmethod
    def from_base(linear: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                  init: str = "gaussian") -> "LoRALinear":
        out_dims, in_dims = linear.weight.shape
        layer = LoRALinear(in_dims, out_dims, r, alpha, dropout, bias="bias" in linear, init=init)
        layer.base_layer = linear
        return layer

    def __init__(self, in_dims: int, out_dims: int, r: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, bias: bool = False, init: str = "gaussian"):
        super().__init__()
        self.base_layer = nn.Linear(in_dims, out_dims, bias=bias)
        self.lora_A = nn.Linear(in_dims, r, bias=False)
        self.lora_B = nn.Linear(r, out_dims, bias=False)
        if init == "gaussian":  # PEFT: nn.init.normal_(lora_A.weight, std=1 / r)
            self.lora_A.weight = mx.random.normal((r, in_dims)) * (1.0 / r)
        else:  # PEFT default: kaiming_uniform_(a=sqrt(5)) -> U(-1/sqrt(in), 1/sqrt(in))
            bound = 1.0 / math.sqrt(in_dims)
            self.lora_A.weight = mx.random.uniform(-bound, bound, (r, in_dims))
        self.lora_B.weight = mx.zeros((out_dims, r))  # a fresh adapter changes nothing
        self.r = r
        self.alpha = alpha
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.dropout_p = dropout
        self.mask_keys: _Keys | None = None  # set by `dropout_keys` for the duration of a train step

    def _dropout(self, x: mx.array) -> mx.array:
        if not self.training or self.mask_keys is None:
            return self.dropout(x)
        keys = self.mask_keys.keys
        if keys.shape[0] != x.shape[0]:
            raise ValueError(f"LoRA dropout: {keys.shape[0]} sample keys for a batch of {x.shape[0]}")
        keep = 1 - self.dropout_p
        mask = mx.stack([mx.random.bernoulli(keep, x.shape[1:], key=keys[i]) for i in range(x.shape[0])])
        return (mask * x) * (1 / keep)  # nn.Dropout's arithmetic

    def __call__(self, x: mx.array) -> mx.array:
        h = self._dropout(x) if self.dropout is not None else x
        # The adapter computes in its own dtype (float32) even over a low-precision base.
        delta = self.scale * self.lora_B(self.lora_A(h.astype(self.lora_A.weight.dtype)))
        return self.base_layer(x) + delta.astype(x.dtype)

    def delta_weight(self) -> mx.array:
        return self.scale * (self.lora_B.weight @ self.lora_A.weight)

    def fuse(self) -> nn.Linear:
        base = self.base_layer
        out_dims, in_dims = base.weight.shape
        fused = nn.Linear(in_dims, out_dims, bias="bias" in base)
        fused.weight = (base.weight + self.delta_weight().astype(base.weight.dtype))
        if "bias" in base:
            fused.bias = base.bias
        return fused


def default_predicate(targets: tuple[str, ...]) -> Callable[[str, nn.Module], bool]:
    """Attention projections inside the UNet's transformer blocks whose path ends in a target."""

    def pred(path: str, module: nn.Module) -> bool:
        return (isinstance(module, nn.Linear) and ".transformer_blocks." in path
                and any(path == t or path.endswith("." + t) for t in targets))

    return pred


def text_encoder_predicate(targets: tuple[str, ...]) -> Callable[[str, nn.Module], bool]:
    """Linear layers of the CLIP encoder's layers whose name is one of `targets` (q_proj, ..., fc1, fc2)."""
    unknown = sorted(set(targets) - set(TEXT_ENCODER_ALLOWED))
    if unknown:
        raise ValueError(f"text-encoder LoRA targets {unknown}: choose from {', '.join(TEXT_ENCODER_ALLOWED)}")

    def pred(path: str, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and ".encoder.layers." in path and path.rsplit(".", 1)[-1] in targets

    return pred


def inject_lora(model: nn.Module, config: LoRAConfig = LoRAConfig(),
                predicate: Callable[[str, nn.Module], bool] | None = None) -> list[str]:
    """Replace every matching nn.Linear with a LoRALinear, freeze the rest; return the paths.

    Afterwards only the adapters' `lora_A`/`lora_B` weights are trainable.
    """
    pred = predicate or default_predicate(config.targets)
    paths = [p for p, m in model.named_modules() if not isinstance(m, LoRALinear) and pred(p, m)]
    if not paths:
        raise ValueError(f"no module matches the LoRA targets {list(config.targets)}")
    mods = dict(model.named_modules())
    model.freeze()
    for p in sorted(paths):
        layer = LoRALinear.from_base(mods[p], config.r, config.alpha, config.dropout, config.init)
        layer.base_layer.freeze()
        set_by_path(model, p, layer)
    return sorted(paths)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {p: m for p, m in model.named_modules() if isinstance(m, LoRALinear)}


class _Keys:
    """A layer's [b, 2] mask keys; held in a plain object so that nn.Module does not count them as parameters."""

    __slots__ = ("keys",)

    def __init__(self, keys: mx.array):
        self.keys = keys


@contextmanager
def dropout_keys(model: nn.Module, keys: mx.array) -> Iterator[None]:
    """Key the LoRA dropout masks of `model` while inside: `keys` [b, L, 2] (uint32, `mx.random.key`'s
    form) holds sample i's key for the l-th of the model's L LoRA layers in path order."""
    layers = [layer for _, layer in sorted(lora_layers(model).items())]
    if keys.shape[1] != len(layers):
        raise ValueError(f"{keys.shape[1]} dropout keys per sample for {len(layers)} LoRA layers")
    for i, layer in enumerate(layers):
        layer.mask_keys = _Keys(keys[:, i])
    try:
        yield
    finally:
        for layer in layers:
            layer.mask_keys = None


def trainable_count(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def fuse_lora(model: nn.Module) -> int:
    """Fold every LoRALinear back into a plain Linear in place; returns how many were fused."""
    layers = lora_layers(model)
    for path, layer in layers.items():
        set_by_path(model, path, layer.fuse())
    return len(layers)
