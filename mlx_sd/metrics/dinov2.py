"""DINOv2 ViT (transformers `Dinov2Model` semantics) for FD-DINOv2, in MLX.

Patch conv (with bias), class token, learned position embeddings for the training grid
(37x37 patches for `facebook/dinov2-large`) resampled to the input's grid with torch's bicubic
(align_corners=False, no antialiasing, float32), pre-norm layers with LayerScale, a final
LayerNorm. The feature is the class token after the final norm (`pooler_output`).

Layouts: pixels [B, H, W, 3] float32, normalised (see `images.dinov2_pixels`), H and W multiples
of the patch size; features [B, hidden] float32. Parameter paths equal transformers' keys
(`encoder.layer.0.attention.attention.query.weight`, `embeddings.mask_token`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..config import ConfigError, read_json
from ..weights import load_strict
from .images import resize_matrix


@dataclass(frozen=True)
class Dinov2Config:
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    mlp_ratio: int = 4
    image_size: int = 518
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True

    @classmethod
    def from_transformers(cls, d: dict) -> Dinov2Config:
        if d.get("use_swiglu_ffn"):
            raise ConfigError("DINOv2 config: use_swiglu_ffn (the giant model) is not supported; use dinov2-large")
        if d.get("hidden_act", "gelu") != "gelu":
            raise ConfigError(f"DINOv2 config: hidden_act={d.get('hidden_act')!r} is not supported")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class PatchEmbeddings(nn.Module):
    def __init__(self, c: Dinov2Config):
        super().__init__()
        self.projection = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size)


class Dinov2Embeddings(nn.Module):
    def __init__(self, c: Dinov2Config):
        super().__init__()
        grid = c.image_size // c.patch_size
        self.cls_token = mx.zeros((1, 1, c.hidden_size))
        self.mask_token = mx.zeros((1, c.hidden_size))  # masked-image pretraining only; kept for strict loading
        self.position_embeddings = mx.zeros((1, grid * grid + 1, c.hidden_size))
        self.patch_embeddings = PatchEmbeddings(c)
        self.grid = grid

    def positions(self, gh: int, gw: int) -> mx.array:
        if (gh, gw) == (self.grid, self.grid):
            return self.position_embeddings
        D = self.position_embeddings.shape[-1]
        patch = self.position_embeddings[0, 1:].reshape(self.grid, self.grid, D)
        ry = mx.array(resize_matrix(self.grid, gh, "bicubic"))
        rx = mx.array(resize_matrix(self.grid, gw, "bicubic"))
        patch = mx.einsum("pw,owd->opd", rx, mx.einsum("oh,hwd->owd", ry, patch))
        return mx.concatenate([self.position_embeddings[:, :1], patch.reshape(1, gh * gw, D)], axis=1)

    def __call__(self, pixels: mx.array) -> mx.array:
        x = self.patch_embeddings.projection(pixels)
        B, gh, gw, D = x.shape
        x = mx.concatenate([mx.broadcast_to(self.cls_token, (B, 1, D)), x.reshape(B, gh * gw, D)], axis=1)
        return x + self.positions(gh, gw)


class SelfAttention(nn.Module):
    def __init__(self, c: Dinov2Config):
        super().__init__()
        self.query = nn.Linear(c.hidden_size, c.hidden_size, bias=c.qkv_bias)
        self.key = nn.Linear(c.hidden_size, c.hidden_size, bias=c.qkv_bias)
        self.value = nn.Linear(c.hidden_size, c.hidden_size, bias=c.qkv_bias)


class SelfOutput(nn.Module):
    def __init__(self, c: Dinov2Config):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)


class Attention(nn.Module):
    def __init__(self, c: Dinov2Config):
        super().__init__()
        self.num_heads = c.num_attention_heads
        self.attention = SelfAttention(c)
        self.output = SelfOutput(c)

    def __call__(self, x: mx.array) -> mx.array:
        B, L, D = x.shape
        h = self.num_heads

        def heads(t):
            return t.reshape(B, L, h, D // h).transpose(0, 2, 1, 3)

        a = self.attention
        o = mx.fast.scaled_dot_product_attention(heads(a.query(x)), heads(a.key(x)), heads(a.value(x)),
                                                 scale=(D // h) ** -0.5)
        return self.output.dense(o.transpose(0, 2, 1, 3).reshape(B, L, D))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.lambda1 = mx.ones((dim,))

    def __call__(self, x):
        return x * self.lambda1


class MLP(nn.Module):
    def __init__(self, c: Dinov2Config):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.hidden_size * c.mlp_ratio)
        self.fc2 = nn.Linear(c.hidden_size * c.mlp_ratio, c.hidden_size)

    def __call__(self, x):
        return self.fc2(nn.gelu(self.fc1(x)))


class Layer(nn.Module):
    def __init__(self, c: Dinov2Config):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.attention = Attention(c)
        self.layer_scale1 = LayerScale(c.hidden_size)
        self.norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = MLP(c)
        self.layer_scale2 = LayerScale(c.hidden_size)

    def __call__(self, x):
        x = x + self.layer_scale1(self.attention(self.norm1(x)))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class Encoder(nn.Module):
    def __init__(self, c: Dinov2Config):
        super().__init__()
        self.layer = [Layer(c) for _ in range(c.num_hidden_layers)]


class Dinov2Model(nn.Module):
    def __init__(self, config: Dinov2Config):
        super().__init__()
        self.config = config
        self.embeddings = Dinov2Embeddings(config)
        self.encoder = Encoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, pixels: mx.array) -> mx.array:
        """[B, H, W, 3] normalised pixels -> [B, hidden] (transformers' `pooler_output`)."""
        x = self.embeddings(pixels)
        for layer in self.encoder.layer:
            x = layer(x)
        return self.layernorm(x[:, 0])


def load_dinov2(folder: str | Path) -> Dinov2Model:
    """Build from `folder/config.json` and strictly load `folder/model.safetensors` (a `python -m convert` output)."""
    folder = Path(folder)
    model = Dinov2Model(Dinov2Config.from_transformers(read_json(folder / "config.json")))
    return load_strict(model, folder / "model.safetensors")
