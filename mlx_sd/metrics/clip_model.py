"""CLIP (transformers `CLIPModel` semantics) for CLIP score and FD-CLIP, in MLX.

The image tower is a ViT: a patch conv (no bias), a class embedding, learned position embeddings,
`pre_layrnorm` (sic, transformers' name), pre-norm encoder layers, `post_layernorm` on the class
token, then `visual_projection` (no bias). The text tower is SD1.x's text encoder
(`mlx_sd.clip.CLIPTextTransformer`: `openai/clip-vit-large-patch14`'s text tower is SD1.5's) pooled
at the end-of-text token, then `text_projection` (no bias).

Layouts: pixels [B, image_size, image_size, 3] float32, already normalised (see
`images.clip_pixels`); token ids [B, L] int. Embeddings [B, projection_dim] float32, not
normalised. Parameter paths equal transformers' state-dict keys (`vision_model.encoder.layers.0.
self_attn.q_proj.weight`), except `logit_scale` and `position_ids`, which are not converted.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..clip import CLIPEncoder, CLIPTextTransformer
from ..config import CLIPTextConfig, ConfigError, read_json
from ..weights import load_strict


@dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class CLIPModelConfig:
    vision: CLIPVisionConfig
    text: CLIPTextConfig
    projection_dim: int = 768
    eos_token_id: int = 2

    @classmethod
    def from_transformers(cls, d: dict) -> CLIPModelConfig:
        if "vision_config" not in d or "text_config" not in d:
            raise ConfigError("CLIP config: expected a CLIPModel config.json with vision_config and text_config")
        v = d["vision_config"]
        if v.get("hidden_act", "quick_gelu") not in ("quick_gelu", "gelu"):
            raise ConfigError(f"CLIP vision config: hidden_act={v.get('hidden_act')!r} is not supported")
        known = {f.name for f in fields(CLIPVisionConfig)}
        vision = CLIPVisionConfig(**{k: val for k, val in v.items() if k in known})
        return cls(vision, CLIPTextConfig.from_diffusers(d["text_config"]), d.get("projection_dim", 768),
                   d["text_config"].get("eos_token_id", 2))


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = mx.zeros((c.hidden_size,))
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size, bias=False)
        self.position_embedding = nn.Embedding((c.image_size // c.patch_size) ** 2 + 1, c.hidden_size)

    def __call__(self, pixels: mx.array) -> mx.array:
        x = self.patch_embedding(pixels)
        B, _, _, D = x.shape
        x = x.reshape(B, -1, D)
        cls = mx.broadcast_to(self.class_embedding, (B, 1, D))
        return mx.concatenate([cls, x], axis=1) + self.position_embedding.weight


class CLIPVisionTransformer(nn.Module):
    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.encoder = CLIPEncoder(c)  # the text tower's layers, no mask
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def __call__(self, pixels: mx.array) -> mx.array:
        """Pooled output [B, hidden]: the class token after `post_layernorm`."""
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers:
            x = layer(x, None)
        return self.post_layernorm(x[:, 0])


class CLIPModel(nn.Module):
    def __init__(self, config: CLIPModelConfig):
        super().__init__()
        self.config = config
        self.vision_model = CLIPVisionTransformer(config.vision)
        self.visual_projection = nn.Linear(config.vision.hidden_size, config.projection_dim, bias=False)
        self.text_model = CLIPTextTransformer(config.text)
        self.text_projection = nn.Linear(config.text.hidden_size, config.projection_dim, bias=False)

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    def image_embeds(self, pixels: mx.array) -> mx.array:
        """[B, S, S, 3] normalised pixels -> [B, projection_dim] (transformers' `get_image_features`)."""
        return self.visual_projection(self.vision_model(pixels))

    def text_embeds(self, input_ids: mx.array) -> mx.array:
        """[B, L] token ids -> [B, projection_dim] (transformers' `get_text_features`).

        Pooled at the end-of-text token: its first position, or (configs with the old
        `eos_token_id` 2, as openai/clip-vit-large-patch14's) the position of the largest id, which
        is the end-of-text token in CLIP's vocabulary. The mask is causal, so padding after that
        token cannot change the pooled value.
        """
        tm = self.text_model
        x = tm.embeddings(input_ids)
        for layer in tm.encoder.layers:
            x = layer(x, "causal")
        x = tm.final_layer_norm(x)
        if self.config.eos_token_id == 2:
            pos = mx.argmax(input_ids, axis=-1)
        else:
            pos = mx.argmax((input_ids == self.config.eos_token_id).astype(mx.int32), axis=-1)
        pooled = mx.take_along_axis(x, pos[:, None, None].astype(mx.int32), axis=1)[:, 0]
        return self.text_projection(pooled)


def load_clip(folder: str | Path) -> CLIPModel:
    """Build from `folder/config.json` and strictly load `folder/model.safetensors` (a `python -m convert` output)."""
    folder = Path(folder)
    model = CLIPModel(CLIPModelConfig.from_transformers(read_json(folder / "config.json")))
    return load_strict(model, folder / "model.safetensors")
