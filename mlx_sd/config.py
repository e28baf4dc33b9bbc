"""Frozen model configs read from diffusers/transformers `config.json` files.

Each `from_diffusers(dict)` keeps the fields the MLX models use, normalises the known quirks
(`attention_head_dim` int or list; SD1.5 stores the *number of heads* under that name) and
rejects configs of architectures this package does not implement, naming the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import MlxSdError


class ConfigError(MlxSdError, ValueError):
    pass


def read_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None


def _per_block(value, n: int, name: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(f"{name} has {len(value)} entries, expected one per block ({n})")
        return tuple(value)
    return (value,) * n


def _require(d: dict, cond: bool, msg: str):
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0

    @classmethod
    def from_diffusers(cls, d: dict) -> "UNetConfig":
        n = len(d.get("block_out_channels", cls.block_out_channels))
        for key, allowed in (
            ("mid_block_type", (None, "UNetMidBlock2DCrossAttn")),
            ("class_embed_type", (None,)),
            ("addition_embed_type", (None,)),
            ("time_embedding_type", (None, "positional")),
            ("resnet_time_scale_shift", (None, "default")),
            ("act_fn", (None, "silu")),
            ("conv_in_kernel", (None, 3)),
            ("conv_out_kernel", (None, 3)),
            ("encoder_hid_dim", (None,)),
            ("time_cond_proj_dim", (None,)),
            ("only_cross_attention", (None, False)),
            ("dual_cross_attention", (None, False)),
        ):
            _require(d, d.get(key) in allowed,
                     f"UNet config: {key}={d.get(key)!r} is not supported (SD1.x/2.x UNets only)")
        for t in d.get("down_block_types", []):
            _require(d, t in ("CrossAttnDownBlock2D", "DownBlock2D"),
                     f"UNet config: down block type {t!r} is not supported")
        for t in d.get("up_block_types", []):
            _require(d, t in ("CrossAttnUpBlock2D", "UpBlock2D"), f"UNet config: up block type {t!r} is not supported")
        # Not read, on purpose: `use_linear_projection` (proj_in/out are Linear here; convert.layout reads it
        # from the config file), `upcast_attention` (SD2.1: both attention paths keep the softmax in float32
        # for any input dtype, so it holds already) and `sample_size` (the input's size decides).
        # diffusers quirk: SD1.x configs store the head *count* in attention_head_dim when
        # num_attention_heads is absent (see UNet2DConditionModel.__init__).
        heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
        return cls(
            in_channels=d.get("in_channels", 4),
            out_channels=d.get("out_channels", 4),
            block_out_channels=tuple(d.get("block_out_channels", cls.block_out_channels)),
            down_block_types=tuple(d.get("down_block_types", cls.down_block_types)),
            up_block_types=tuple(d.get("up_block_types", cls.up_block_types)),
            layers_per_block=_per_block(d.get("layers_per_block", 2), n, "layers_per_block"),
            num_attention_heads=_per_block(heads, n, "attention_head_dim"),
            transformer_layers_per_block=_per_block(d.get("transformer_layers_per_block", 1), n,
                                                    "transformer_layers_per_block"),
            cross_attention_dim=d.get("cross_attention_dim", 768),
            norm_num_groups=d.get("norm_num_groups", 32),
            norm_eps=d.get("norm_eps", 1e-5),
            flip_sin_to_cos=d.get("flip_sin_to_cos", True),
            freq_shift=d.get("freq_shift", 0),
            downsample_padding=d.get("downsample_padding", 1),
            mid_block_scale_factor=d.get("mid_block_scale_factor", 1.0),
        )


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215

    @classmethod
    def from_diffusers(cls, d: dict) -> "VAEConfig":
        for t in d.get("down_block_types", []):
            _require(d, t == "DownEncoderBlock2D", f"VAE config: down block type {t!r} is not supported")
        for t in d.get("up_block_types", []):
            _require(d, t == "UpDecoderBlock2D", f"VAE config: up block type {t!r} is not supported")
        _require(d, d.get("act_fn", "silu") == "silu", f"VAE config: act_fn={d.get('act_fn')!r} is not supported")
        return cls(
            in_channels=d.get("in_channels", 3),
            out_channels=d.get("out_channels", 3),
            latent_channels=d.get("latent_channels", 4),
            block_out_channels=tuple(d.get("block_out_channels", cls.block_out_channels)),
            layers_per_block=d.get("layers_per_block", 2),
            norm_num_groups=d.get("norm_num_groups", 32),
            scaling_factor=d.get("scaling_factor", 0.18215),
        )


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_diffusers(cls, d: dict) -> "CLIPTextConfig":
        if "text_config" in d:  # a full CLIPModel config
            d = d["text_config"]
        _require(d, d.get("hidden_act", "quick_gelu") in ("quick_gelu", "gelu"),
                 f"text encoder config: hidden_act={d.get('hidden_act')!r} is not supported")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    clip_sample: bool = False
    timestep_spacing: str = "leading"
    trained_betas: tuple[float, ...] | None = None

    @classmethod
    def from_diffusers(cls, d: dict) -> "SchedulerConfig":
        _require(d, d.get("beta_schedule", "scaled_linear") in ("linear", "scaled_linear", "squaredcos_cap_v2"),
                 f"scheduler config: beta_schedule={d.get('beta_schedule')!r} is not supported")
        _require(d, d.get("prediction_type", "epsilon") in ("epsilon", "v_prediction"),
                 f"scheduler config: prediction_type={d.get('prediction_type')!r} is not supported")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if kw.get("trained_betas") is not None:
            kw["trained_betas"] = tuple(kw["trained_betas"])
        return cls(**kw)
