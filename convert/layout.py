"""Key/layout mapping between diffusers/transformers state dicts and the MLX models.

Names are kept (the MLX modules use diffusers' attribute names); only layouts change:
- 4-D conv weights OIHW (torch) <-> OHWI (MLX);
- the UNet transformer `proj_in`/`proj_out` are 1x1 convs in SD1.x (`use_linear_projection`
  false) and Linear in the MLX model: squeezed to (out, in);
- old diffusers VAE checkpoints name the mid-block attention `query/key/value/proj_attn`
  (the published SD1.5 VAE does): renamed to `to_q/to_k/to_v/to_out.0`, 1x1-conv shapes squeezed;
- transformers' `position_ids` buffer is not a parameter and is dropped;
- text encoder keys carry the `text_model.` prefix of the published SD1.5 file (transformers 5
  saves them without it; both are accepted).
"""

from __future__ import annotations

import re

import mlx.core as mx

from mlx_sd.model_folder import COMPONENTS

_OLD_VAE_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_OLD_ATTN_RE = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_LINEAR_1X1_RE = re.compile(r"(^|\.)(proj_in|proj_out|to_q|to_k|to_v|to_out\.0)\.weight$")



def diffusers_to_mlx(component: str, tensors: dict[str, mx.array]) -> dict[str, mx.array]:
    """Map one component's diffusers/transformers tensors to the MLX model's names and layouts."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; expected one of {COMPONENTS}")
    out = {}
    for key, value in tensors.items():
        if key.endswith("position_ids"):
            continue
        if component == "text_encoder" and not key.startswith("text_model."):
            key = "text_model." + key
        m = _OLD_ATTN_RE.match(key)
        if m:
            key = f"{m.group(1)}.{_OLD_VAE_ATTN[m.group(2)]}.{m.group(3)}"
        if value.ndim == 4:
            if _LINEAR_1X1_RE.search(key) and value.shape[2:] == (1, 1):
                value = value.reshape(value.shape[:2])
            else:
                value = value.transpose(0, 2, 3, 1)
        out[key] = value
    return out


def mlx_to_diffusers(component: str, tensors: dict[str, mx.array], config: dict) -> dict[str, mx.array]:
    """Inverse of `diffusers_to_mlx` (current diffusers names), for writing diffusers folders.

    `config` is the component's diffusers config.json: it says whether the UNet's
    `proj_in`/`proj_out` are convs (SD1.x) or Linear (`use_linear_projection`).
    """
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; expected one of {COMPONENTS}")
    conv_proj = component == "unet" and not config.get("use_linear_projection", False)
    out = {}
    for key, value in tensors.items():
        if value.ndim == 4:
            value = value.transpose(0, 3, 1, 2)
        elif conv_proj and value.ndim == 2 and re.search(r"\.(proj_in|proj_out)\.weight$", key):
            value = value.reshape(*value.shape, 1, 1)
        out[key] = value
    return out
