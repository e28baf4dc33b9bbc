"""LoRA for the MLX UNet: layers and injection (`lora.layers`), adapter files (`lora.formats`)."""

import mlx_sd  # noqa: F401  (fast BLAS before mlx.core)

from .layers import (
    DEFAULT_TARGETS,
    LoRAConfig,
    LoRALinear,
    fuse_lora,
    inject_lora,
    lora_layers,
    trainable_count,
)

__all__ = [
    "DEFAULT_TARGETS",
    "LoRAConfig",
    "LoRALinear",
    "fuse_lora",
    "inject_lora",
    "lora_layers",
    "trainable_count",
]
