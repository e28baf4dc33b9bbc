"""CLIP text encoder (transformers `CLIPTextModel` semantics) in MLX.

Input: token ids [B, 77] (int). Output: `last_hidden_state` [B, 77, hidden] after the final layer
norm, which is what SD1.x conditions the UNet on. Attention is causal; the activation is
quick_gelu (x * sigmoid(1.702 x)) for SD1.x. Attribute names follow transformers, so parameter
paths equal the `text_model.*` keys of `model.safetensors`.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .config import CLIPTextConfig, read_json
from .weights import load_strict


def quick_gelu(x: mx.array) -> mx.array:
    return x * mx.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array, mask) -> mx.array:
        B, L, D = x.shape
        h = self.num_heads

        def heads(t):
            return t.reshape(B, L, h, D // h).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.out_proj(o.transpose(0, 2, 1, 3).reshape(B, L, D))


class CLIPMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = quick_gelu if config.hidden_act == "quick_gelu" else nn.gelu

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self_attn = CLIPAttention(config.hidden_size, config.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def __call__(self, input_ids):
        L = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:L]


class CLIPEncoder(nn.Module):
    """Pre-norm transformer layers; `config` is a text or vision config (hidden, heads, MLP size, act, eps)."""

    def __init__(self, config):
        super().__init__()
        self.layers = [CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)]


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPTextModel(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    def __call__(self, input_ids: mx.array, clip_skip: int = 0) -> mx.array:
        """Return last_hidden_state [B, L, hidden].

        `clip_skip` k > 0 takes the output of the k-th layer from the end (A1111's "clip skip"
        counts from 1 = last layer, so pass its value minus 1) and still applies the final
        layer norm, as diffusers' pipelines do.
        """
        tm = self.text_model
        x = tm.embeddings(input_ids)
        layers = tm.encoder.layers
        if clip_skip:
            layers = layers[: len(layers) - clip_skip]
        for layer in layers:
            x = layer(x, "causal")
        return tm.final_layer_norm(x)


def load_text_encoder(folder: str | Path) -> CLIPTextModel:
    """Build from `folder/config.json` and strictly load `folder/model.safetensors` (MLX layout)."""
    folder = Path(folder)
    model = CLIPTextModel(CLIPTextConfig.from_diffusers(read_json(folder / "config.json")))
    return load_strict(model, folder / "model.safetensors")
