"""LoRA for the MLX UNet and CLIP text encoder: layers and injection (`lora.layers`), adapter files
(`lora.formats`; written by `lora.export`)."""

import mlx_sd  # noqa: F401  (fast BLAS before mlx.core)

from .layers import (
    DEFAULT_TARGETS,
    TEXT_ENCODER_ALLOWED,
    TEXT_ENCODER_TARGETS,
    LoRAConfig,
    LoRALinear,
    fuse_lora,
    inject_lora,
    lora_layers,
    text_encoder_predicate,
    trainable_count,
)

__all__ = [
    "DEFAULT_TARGETS",
    "TEXT_ENCODER_ALLOWED",
    "TEXT_ENCODER_TARGETS",
    "LoRAConfig",
    "LoRALinear",
    "fuse_lora",
    "inject_lora",
    "lora_layers",
    "text_encoder_predicate",
    "trainable_count",
]
