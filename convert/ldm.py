"""Original single-file checkpoints (CompVis/LDM layout) <-> diffusers names, both ways.

An SD1.x single file (`v1-5-pruned-emaonly.safetensors`, A1111/ComfyUI checkpoints) holds
    model.diffusion_model.*                 the UNet (input_blocks / middle_block / output_blocks)
    first_stage_model.*                     the VAE (encoder.down / mid / decoder.up, reversed)
    cond_stage_model.transformer.*          the CLIP text model (transformers names)
    model_ema.*                             optional EMA copy of the UNet, dots removed from names
plus non-weight buffers (DDPM schedule, `position_ids`) that are ignored.

Only names change here, plus one layout the two formats disagree on: the VAE mid-block
attention q/k/v/proj_out are 1x1 convs (out, in, 1, 1) in LDM and Linear (out, in) in diffusers.
The UNet transformer `proj_in`/`proj_out` are 1x1 convs in both (SD1.x). Tensors keep torch
layouts (OIHW); `convert.layout` does the diffusers <-> MLX step.

The block numbering is read from the keys themselves (where the down/upsamplers sit), so the
same functions serve SD1.5 and the narrower test configs.
"""

from __future__ import annotations

import re

import mlx.core as mx

UNET = "model.diffusion_model."
VAE = "first_stage_model."
TEXT = "cond_stage_model.transformer."
EMA = "model_ema."

# Buffers and training leftovers an SD1.x file may carry; none is a model weight.
IGNORED = re.compile(
    r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod"
    r"|posterior_variance|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2"
    r"|logvar|model_ema\.decay|model_ema\.num_updates)$"
    r"|^first_stage_model\.loss\."  # the VAE's training loss (LPIPS, discriminator) in unpruned files
    r"|position_ids$"
)

# UNet resnet parts: LDM ResBlock -> diffusers ResnetBlock2D.
_UNET_RES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_UNET_FIXED = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
               "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
_VAE_FIXED = {"encoder.norm_out": "encoder.conv_norm_out", "decoder.norm_out": "decoder.conv_norm_out"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


class LDMKeyError(KeyError):
    """Keys a mapping cannot place (or needs and lacks); `.keys` lists them all."""

    def __init__(self, title: str, keys: list[str]):
        self.keys = sorted(keys)
        shown = "\n  ".join(self.keys[:50]) + (f"\n  ... and {len(self.keys) - 50} more" if len(self.keys) > 50 else "")
        super().__init__(f"{title} ({len(self.keys)}):\n  {shown}")

    def __str__(self):
        return self.args[0]


def _swap(name: str, table: dict[str, str]) -> str | None:
    """`name` with a leading table entry (matched on whole dotted parts) replaced, or None."""
    for old, new in table.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old):]
    return None


def _flat_ema_key(ldm_key: str) -> str:
    # LitEma stores `model.diffusion_model.a.0.b` as `model_ema.diffusion_modela0b`.
    return EMA + "".join(ldm_key.split(".")[1:])


def select_unet_weights(state_dict: dict, prefer_ema: bool = True) -> tuple[dict, str]:
    """Drop the EMA copy or put it in place of the UNet weights; say which was kept.

    Returns (state_dict without `model_ema.*`, kind) with kind "ema" (file had both, EMA kept),
    "non-ema" (file had both, `prefer_ema=False`) or "only" (one set: used as it is).
    Like diffusers, a file counts as having EMA weights with more than 100 `model_ema.` keys.
    """
    ema_keys = [k for k in state_dict if k.startswith(EMA) and not IGNORED.search(k)]
    rest = {k: v for k, v in state_dict.items() if not k.startswith(EMA)}
    if len(ema_keys) <= 100:
        return rest, "only"
    if not prefer_ema:
        return rest, "non-ema"
    unet_keys = [k for k in rest if k.startswith(UNET)]
    if not unet_keys:
        raise LDMKeyError("EMA weights but no model.diffusion_model.* names to place them", ema_keys)
    missing = [_flat_ema_key(k) for k in unet_keys if _flat_ema_key(k) not in state_dict]
    if missing:
        raise LDMKeyError("EMA weights incomplete (--non-ema uses the others); missing", missing)
    for k in unet_keys:
        rest[k] = state_dict[_flat_ema_key(k)]
    return rest, "ema"


def _unet_layout(names: list[str]) -> tuple[dict, dict, dict, dict]:
    """From LDM UNet names: input/output block index -> (block, layer), and where samplers sit."""
    def idx(prefix: str) -> list[int]:
        return sorted({int(m.group(1)) for n in names if (m := re.match(prefix + r"\.(\d+)\.", n))})

    inputs, downs, b, l = {}, {}, 0, 0
    for i in idx("input_blocks"):
        if i == 0:
            continue
        if f"input_blocks.{i}.0.op.weight" in names:
            downs[i], b, l = b, b + 1, 0
        else:
            inputs[i], l = (b, l), l + 1
    outputs, ups, b, l = {}, {}, 0, 0
    for i in idx("output_blocks"):
        outputs[i] = (b, l)
        sub = next((s for s in (1, 2) if f"output_blocks.{i}.{s}.conv.weight" in names), None)
        if sub is not None:
            ups[(i, sub)] = b
            b, l = b + 1, 0
        else:
            l += 1
    return inputs, downs, outputs, ups


def _unet_key(name: str, layout) -> str | None:
    """One LDM UNet name (without `model.diffusion_model.`) -> its diffusers name, or None."""
    inputs, downs, outputs, ups = layout
    if (fixed := _swap(name, _UNET_FIXED)) is not None:
        return fixed
    if m := re.match(r"input_blocks\.(\d+)\.0\.op\.(weight|bias)$", name):
        i = int(m.group(1))
        return f"down_blocks.{downs[i]}.downsamplers.0.conv.{m.group(2)}" if i in downs else None
    if m := re.match(r"(input|output)_blocks\.(\d+)\.(\d)\.(.+)$", name):
        kind, i, sub, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if kind == "output" and (i, sub) in ups and re.match(r"conv\.(weight|bias)$", rest):
            return f"up_blocks.{ups[(i, sub)]}.upsamplers.0.{rest}"
        table = inputs if kind == "input" else outputs
        if i not in table:
            return None
        b, l = table[i]
        block = f"{'down' if kind == 'input' else 'up'}_blocks.{b}"
        if sub == 0:
            part = _swap(rest, _UNET_RES)
            return f"{block}.resnets.{l}.{part}" if part else None
        return f"{block}.attentions.{l}.{rest}" if sub == 1 else None
    if m := re.match(r"middle_block\.([012])\.(.+)$", name):
        j, rest = int(m.group(1)), m.group(2)
        if j == 1:
            return f"mid_block.attentions.0.{rest}"
        part = _swap(rest, _UNET_RES)
        return f"mid_block.resnets.{j // 2}.{part}" if part else None
    return None


def _vae_key(name: str, n_up: int) -> str | None:
    """One LDM VAE name (without `first_stage_model.`) -> its diffusers name, or None."""
    if (fixed := _swap(name, _VAE_FIXED)) is not None:
        return fixed
    if re.match(r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)$|(post_)?quant_conv\.(weight|bias)$", name):
        return name
    if m := re.match(r"(encoder|decoder)\.mid\.(block_[12]|attn_1)\.(.+)$", name):
        part, rest = m.group(2), m.group(3)
        if part == "attn_1":
            attn = _swap(rest, _VAE_ATTN)
            return f"{m.group(1)}.mid_block.attentions.0.{attn}" if attn else None
        return f"{m.group(1)}.mid_block.resnets.{int(part[-1]) - 1}.{rest.replace('nin_shortcut', 'conv_shortcut')}"
    if m := re.match(r"encoder\.down\.(\d+)\.(block\.(\d+)|downsample)\.(.+)$", name):
        i, rest = m.group(1), m.group(4)
        if m.group(3) is not None:
            return f"encoder.down_blocks.{i}.resnets.{m.group(3)}.{rest.replace('nin_shortcut', 'conv_shortcut')}"
        return f"encoder.down_blocks.{i}.downsamplers.0.{rest}"
    if m := re.match(r"decoder\.up\.(\d+)\.(block\.(\d+)|upsample)\.(.+)$", name):
        i, rest = n_up - 1 - int(m.group(1)), m.group(4)  # LDM counts decoder levels from the bottom
        if m.group(3) is not None:
            return f"decoder.up_blocks.{i}.resnets.{m.group(3)}.{rest.replace('nin_shortcut', 'conv_shortcut')}"
        return f"decoder.up_blocks.{i}.upsamplers.0.{rest}"
    return None


def ldm_to_diffusers(state_dict: dict[str, mx.array], prefer_ema: bool = True) -> dict[str, dict[str, mx.array]]:
    """An SD1.x original-layout state dict -> {"unet", "vae", "text_encoder"} in diffusers names.

    EMA UNet weights are used when the file has both (see `select_unet_weights`). Known
    non-weight buffers are dropped; any other key that has no place raises LDMKeyError listing
    all of them. VAE mid-block attention 1x1 convs become Linear weights, as diffusers has them.
    """
    state_dict, _ = select_unet_weights(state_dict, prefer_ema)
    unet_names = [k[len(UNET):] for k in state_dict if k.startswith(UNET)]
    layout = _unet_layout(unet_names)
    n_up = len({m.group(1) for k in state_dict if (m := re.match(re.escape(VAE) + r"decoder\.up\.(\d+)\.", k))})
    out = {"unet": {}, "vae": {}, "text_encoder": {}}
    unplaced = []
    for key, value in state_dict.items():
        if IGNORED.search(key):
            continue
        comp, new = None, None
        if key.startswith(UNET):
            comp, new = "unet", _unet_key(key[len(UNET):], layout)
        elif key.startswith(VAE):
            comp, new = "vae", _vae_key(key[len(VAE):], n_up)
            if new and ".mid_block.attentions." in new and new.endswith(".weight") and value.ndim == 4:
                value = value.reshape(value.shape[:2])
        elif key.startswith(TEXT):
            rest = key[len(TEXT):]
            # Files made with transformers < 4.x lack the `text_model.` level.
            comp, new = "text_encoder", rest if rest.startswith("text_model.") else "text_model." + rest
        if new is None:
            unplaced.append(key)
        else:
            out[comp][new] = value
    if unplaced:
        raise LDMKeyError("keys with no place in an SD1.x checkpoint", unplaced)
    return out


def _count(names, prefix: str) -> int:
    return len({m.group(1) for n in names if (m := re.match(re.escape(prefix) + r"(\d+)\.", n))})


def diffusers_to_ldm(components: dict[str, dict[str, mx.array]]) -> dict[str, mx.array]:
    """Inverse of `ldm_to_diffusers`: diffusers-named UNet/VAE/text encoder -> one LDM state dict.

    Also writes the text model's `position_ids` buffer (int64, as in the published SD1.5 file).
    """
    out = {}
    unet = components["unet"]
    names = list(unet)
    table = dict((v, k) for k, v in _UNET_FIXED.items())
    res_back = {v: k for k, v in _UNET_RES.items()}
    idx, n_down = 1, _count(names, "down_blocks.")
    for b in range(n_down):
        for l in range(_count(names, f"down_blocks.{b}.resnets.")):
            table[f"down_blocks.{b}.resnets.{l}"] = f"input_blocks.{idx}.0"
            table[f"down_blocks.{b}.attentions.{l}"] = f"input_blocks.{idx}.1"
            idx += 1
        if any(n.startswith(f"down_blocks.{b}.downsamplers.") for n in names):
            table[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{idx}.0.op"
            idx += 1
    idx = 0
    for b in range(_count(names, "up_blocks.")):
        for l in range(_count(names, f"up_blocks.{b}.resnets.")):
            table[f"up_blocks.{b}.resnets.{l}"] = f"output_blocks.{idx}.0"
            table[f"up_blocks.{b}.attentions.{l}"] = f"output_blocks.{idx}.1"
            idx += 1
        has_attn = any(n.startswith(f"up_blocks.{b}.attentions.") for n in names)
        table[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{idx - 1}.{2 if has_attn else 1}.conv"
    table["mid_block.attentions.0"] = "middle_block.1"
    for j in (0, 1):
        table[f"mid_block.resnets.{j}"] = f"middle_block.{2 * j}"
    unplaced = []
    for key, value in unet.items():
        m = re.match(r"((?:down_blocks|up_blocks)\.\d+\.(?:resnets|attentions)\.\d+"
                     r"|mid_block\.(?:resnets|attentions)\.\d+"
                     r"|(?:down|up)_blocks\.\d+\.(?:down|up)samplers\.0\.conv|time_embedding\.linear_[12]"
                     r"|conv_in|conv_norm_out|conv_out)\.(.+)$", key)
        if not m or m.group(1) not in table:
            unplaced.append(f"unet: {key}")
            continue
        head, rest = m.group(1), m.group(2)
        if ".resnets." in head:
            rest = _swap(rest, res_back) or rest
        out[UNET + table[head] + "." + rest] = value

    vae = components["vae"]
    n_up = _count(vae, "decoder.up_blocks.")
    attn_back = {v: k for k, v in _VAE_ATTN.items()}
    for key, value in vae.items():
        new = key
        for old, ldm in ((r"encoder\.down_blocks\.(\d+)\.resnets\.", lambda m: f"encoder.down.{m[1]}.block."),
                         (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.",
                          lambda m: f"encoder.down.{m[1]}.downsample."),
                         (r"decoder\.up_blocks\.(\d+)\.resnets\.",
                          lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block."),
                         (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                          lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample."),
                         (r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.",
                          lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
                         (r"(encoder|decoder)\.conv_norm_out\.", lambda m: f"{m[1]}.norm_out.")):
            new = re.sub("^" + old, ldm, new)
        if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)$", key):
            part = _swap(m.group(2), attn_back)
            new = f"{m.group(1)}.mid.attn_1.{part}" if part else key
            if part and new.endswith(".weight") and value.ndim == 2:
                value = value.reshape(*value.shape, 1, 1)  # LDM's AttnBlock uses 1x1 convs
        new = new.replace("conv_shortcut", "nin_shortcut")
        if new == key and not re.match(r"(encoder|decoder)\.(conv_in|conv_out)\.|(post_)?quant_conv\.", key):
            unplaced.append(f"vae: {key}")
            continue
        out[VAE + new] = value

    for key, value in components["text_encoder"].items():
        if key.endswith("position_ids"):
            continue
        out[TEXT + (key if key.startswith("text_model.") else "text_model." + key)] = value
        if key.endswith("embeddings.position_embedding.weight"):
            out[TEXT + "text_model.embeddings.position_ids"] = mx.arange(value.shape[0], dtype=mx.int64)[None]
    if unplaced:
        raise LDMKeyError("diffusers names with no place in an SD1.x single file", unplaced)
    return out


def detect_architecture(state_dict: dict) -> str | None:
    """Name the architecture of a single file this package cannot convert, or None for SD1.x.

    Looks only at names and a few shapes, so it runs before anything is converted.
    """
    keys = state_dict.keys()
    unet_in = state_dict.get(UNET + "input_blocks.0.0.weight")
    in_ch = unet_in.shape[1] if unet_in is not None and unet_in.ndim == 4 else None
    ctx = next((state_dict[k].shape[-1] for k in keys if k.startswith(UNET) and k.endswith("attn2.to_k.weight")), None)
    inpaint = " inpainting" if in_ch == 9 else ""
    if any(k.startswith("conditioner.embedders.") for k in keys) or ctx in (1280, 2048):
        return (f"Stable Diffusion XL{inpaint} (conditioner.embedders.* text encoders, {ctx or 2048}-d context)")
    if any(k.startswith("cond_stage_model.model.") for k in keys) or ctx == 1024:
        return (f"Stable Diffusion 2.x{inpaint} (OpenCLIP text encoder cond_stage_model.model.*, 1024-d context)")
    if any(k.startswith(UNET + p) for k in keys for p in ("joint_blocks.", "double_blocks.")):
        return "Stable Diffusion 3 / FLUX (a transformer, not a UNet)"
    if any(k.startswith("control_model.") for k in keys):
        return "a ControlNet (control_model.*)"
    if in_ch == 9:
        return ("a Stable Diffusion 1.x inpainting model "
                "(9 input channels on model.diffusion_model.input_blocks.0.0.weight)")
    if in_ch == 8:
        return "an InstructPix2Pix-style model (8 input channels on model.diffusion_model.input_blocks.0.0.weight)"
    if not any(k.startswith(UNET) or k.startswith(EMA) for k in keys):
        if any(k.startswith(("lora_unet_", "lora_te", "unet.")) or ".lora_down." in k or "lora_A" in k for k in keys):
            return "a LoRA adapter, not a full checkpoint (load it with --lora instead)"
        if any(k.startswith(("down_blocks.", "mid_block.", "encoder.", "decoder.")) for k in keys):
            return ("one diffusers-named component, not an original full checkpoint "
                    "(convert the diffusers folder instead)")
        return "not an original Stable Diffusion checkpoint (no model.diffusion_model.* keys)"
    return None
