"""Adapter files: the formats other tools load, and reading them (writing: `lora.export`).

- PEFT folder: `adapter_model.safetensors` (`base_model.model.<path>.lora_A.weight`, ...) +
  `adapter_config.json` (a LoraConfig), what `PeftModel.from_pretrained` reads. A text-encoder
  LoRA is a second PEFT folder, `text_encoder/`, as PEFT's own SD scripts save it; its keys follow
  transformers >= 5's CLIPTextModel, which has no `text_model.` level
  (`base_model.model.encoder.layers.0.self_attn.q_proj.lora_A.weight`).
- diffusers: `pytorch_lora_weights.safetensors` (`unet.<path>.lora_A.weight`, ... and
  `text_encoder.text_model.<path>.lora_A.weight`) with the LoraConfig fields, prefixed `unet.` /
  `text_encoder.`, in the `lora_adapter_metadata` header entry; without it diffusers assumes
  alpha = r.
- kohya / A1111 / ComfyUI: `lora_unet_<path with _>.lora_down.weight` (A), `.lora_up.weight`
  (B) and a scalar `.alpha` per module; `lora_te_text_model_encoder_...` for the text encoder.
Import also reads diffusers' older `lora.down/lora.up`, `lora_linear_layer` and attention-processor
namings, and CLIP paths with or without `text_model.`.

An `Adapter` holds, per UNet module path, A (r, in), B (out, r) and alpha, and optionally the
same for the text encoder (`text_encoder`, keyed by MLX CLIP paths `text_model.encoder...`); the
update it applies is `W += scale * (alpha / r) * B @ A`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_sd.errors import MlxSdError
from mlx_sd.io import safetensors_problem

from .layers import LoRALinear, lora_layers

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS = "lora_kohya.safetensors"
TEXT_ENCODER_DIR = "text_encoder"  # the text encoder's PEFT folder, inside the UNet's
FORMATS = ("peft", "diffusers", "kohya")
TEXT_PREFIX = "text_model."  # MLX's (and transformers < 5's) CLIP paths start with it


def _clip_path(path: str) -> str:
    """A CLIP module path as MLX names it, from either transformers layout."""
    return path if path.startswith(TEXT_PREFIX) else TEXT_PREFIX + path


class AdapterError(MlxSdError, ValueError):
    pass


@dataclass
class Adapter:
    A: dict[str, mx.array]  # module path (or kohya underscore name until resolved) -> (r, in)
    B: dict[str, mx.array]  # -> (out, r)
    alpha: dict[str, float]
    metadata: dict = field(default_factory=dict)
    source: str = ""
    text_encoder: "Adapter | None" = None  # the CLIP text encoder's part, if it has one

    def rank(self, key: str) -> int:
        return int(self.A[key].shape[0])

    def scale(self, key: str) -> float:
        return self.alpha[key] / self.rank(key)



# ----------------------------------------------------------------------------- export


def adapter_from_model(model: nn.Module, metadata: dict | None = None,
                       text_encoder: nn.Module | None = None) -> Adapter:
    """The LoRA layers of `model` (the UNet) and, if given and injected, of `text_encoder`."""
    layers = lora_layers(model)
    if not layers:
        raise AdapterError("the model has no LoRA layers to export")
    te = None
    if text_encoder is not None and lora_layers(text_encoder):
        te = adapter_from_model(text_encoder, metadata)
    return Adapter(
        A={p: l.lora_A.weight for p, l in layers.items()},
        B={p: l.lora_B.weight for p, l in layers.items()},
        alpha={p: float(l.alpha) for p, l in layers.items()},
        metadata=dict(metadata or {}),
        text_encoder=te,
    )


def kohya_name(path: str, text: bool = False) -> str:
    return ("lora_te_" if text else "lora_unet_") + path.replace(".", "_")




_DIFFUSERS_OLD = re.compile(r"^(?:unet\.)?(.+)\.lora\.(down|up)\.weight$")
_PROCESSOR = re.compile(r"^(?:unet\.)?(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_LORA_AB = re.compile(r"^(.+)\.lora_(A|B)(?:\.default)?\.weight$")
_KOHYA = re.compile(r"^lora_unet_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
# Text encoder (after `text_encoder.` / `base_model.model.` is removed): PEFT's lora_A/B, diffusers'
# lora.down/up and lora_linear_layer.down/up, and its older `self_attn.to_q_lora.down` naming.
_TE_AB = re.compile(r"^(.+)\.(?:lora_(A|B)(?:\.default)?|lora(?:_linear_layer)?\.(down|up))\.weight$")
_TE_ATTN_OLD = re.compile(r"^(.+\.self_attn)\.to_(q|k|v|out)_lora\.(down|up)\.weight$")
_KOHYA_TE = re.compile(r"^lora_te1?_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_CLIP_PATH = re.compile(r"^(?:text_model\.)?encoder\.layers\.\d+\.")


def _pattern_value(patterns: dict, path: str, default):
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _is_text_key(key: str) -> bool:
    return key.startswith(("lora_te_", "lora_te1_", "text_encoder.")) or (
        key.startswith("base_model.model.") and bool(_CLIP_PATH.match(key[len("base_model.model."):])))


def _parse_unet(tensors: dict[str, mx.array]):
    A, B, kohya_alpha, bad = {}, {}, {}, []
    for key, value in tensors.items():
        if m := _KOHYA.match(key):
            name, kind = m.groups()
            if kind == "alpha":
                kohya_alpha[name] = float(value.item())
            else:
                (A if kind.startswith("lora_down") else B)[name] = value
        elif m := _PROCESSOR.match(key):
            base, proj, kind = m.groups()
            path = f"{base}.{'to_out.0' if proj == 'to_out' else proj}"
            (A if kind == "down" else B)[path] = value
        elif m := _DIFFUSERS_OLD.match(key):
            (A if m.group(2) == "down" else B)[m.group(1)] = value
        elif m := _LORA_AB.match(key):
            path = m.group(1)
            for prefix in ("base_model.model.", "unet."):
                path = path.removeprefix(prefix)
            (A if m.group(2) == "A" else B)[path] = value
        elif key.endswith(".alpha") and key.startswith("unet."):
            kohya_alpha[key[len("unet."):-len(".alpha")]] = float(value.item())
        else:
            bad.append(key)
    return A, B, kohya_alpha, bad


def _parse_text(tensors: dict[str, mx.array]):
    """Text-encoder keys -> MLX CLIP paths (`text_model.encoder...`; kohya names stay underscored until
    `resolve`), whichever transformers layout (with or without `text_model.`) the file was made for."""
    A, B, kohya_alpha, bad = {}, {}, {}, []
    for key, value in tensors.items():
        if m := _KOHYA_TE.match(key):
            name, kind = m.groups()
            name = name if name.startswith("text_model_") else "text_model_" + name
            if kind == "alpha":
                kohya_alpha[name] = float(value.item())
            else:
                (A if kind.startswith("lora_down") else B)[name] = value
            continue
        k = key.removeprefix("text_encoder.").removeprefix("base_model.model.")
        if m := _TE_ATTN_OLD.match(k):
            path, down = f"{m.group(1)}.{m.group(2)}_proj", m.group(3) == "down"
        elif m := _TE_AB.match(k):
            path, down = m.group(1), m.group(2) == "A" or m.group(3) == "down"
        elif k.endswith(".alpha"):
            kohya_alpha[_clip_path(k[:-len(".alpha")])] = float(value.item())
            continue
        else:
            bad.append(key)
            continue
        (A if down else B)[_clip_path(path)] = value
    return A, B, kohya_alpha, bad


def _assemble(parsed, cfg: dict, source: str, what: str) -> Adapter:
    A, B, kohya_alpha, bad = parsed
    unpaired = sorted(set(A) ^ set(B))
    if bad or unpaired:
        lines = [f"{source}: not a {what} LoRA in a known format:"]
        if bad:
            lines += [f"  unrecognised key: {k}" for k in bad[:30]]
            lines += [f"  ... {len(bad) - 30} more"] if len(bad) > 30 else []
        if unpaired:
            lines += [f"  down/A without up/B (or the reverse): {k}" for k in unpaired[:30]]
        raise AdapterError("\n".join(lines))
    alpha = {}
    for k in A:
        if k in kohya_alpha:
            alpha[k] = kohya_alpha[k]
        elif cfg.get("lora_alpha") is not None:
            alpha[k] = float(_pattern_value(cfg.get("alpha_pattern"), k, cfg["lora_alpha"]))
        else:  # what diffusers/PEFT assume without metadata
            alpha[k] = float(A[k].shape[0])
    return Adapter(A, B, alpha, source=source)


def _parse(tensors: dict[str, mx.array], metadata: dict, config: dict | None, source: str) -> Adapter:
    second = [k for k in tensors if k.startswith(("lora_te2_", "text_encoder_2."))]
    if second:
        raise AdapterError(f"{source}: {len(second)} tensors for a second text encoder (e.g. {second[0]}): an SDXL "
                           "adapter; this is an SD1.x model")
    raw = json.loads(metadata["lora_adapter_metadata"]) if "lora_adapter_metadata" in metadata else {}

    def meta(prefix):
        return {k.removeprefix(prefix): v for k, v in raw.items() if k.startswith(prefix)}

    text = {k: v for k, v in tensors.items() if _is_text_key(k)}
    unet = _assemble(_parse_unet({k: v for k, v in tensors.items() if k not in text}), config or meta("unet."),
                     source, "UNet")
    te = _assemble(_parse_text(text), config or meta("text_encoder."), source, "text-encoder") if text else None
    if not unet.A and te is None:
        raise AdapterError(f"{source}: no LoRA tensors found")
    ours = {k.removeprefix("mlx_sd."): v for k, v in metadata.items() if k.startswith("mlx_sd.")}
    for k, v in list(ours.items()):
        try:
            ours[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            pass
    unet.metadata, unet.text_encoder = ours, te
    return unet


def _read_peft_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path}: not a readable PEFT adapter config ({e}); export the adapter again") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: not a PEFT adapter config (expected a JSON object)")
    return config


def _read(path: Path, config: dict | None) -> Adapter:
    if not path.exists():
        raise AdapterError(f"{path}: adapter file not found")
    if path.suffix != ".safetensors":
        raise AdapterError(f"{path}: only .safetensors adapters are read (pickle files are not loaded)")
    if problem := safetensors_problem(path):
        raise AdapterError(f"{path}: cannot load this adapter: {problem}. Export it again, or use another copy.")
    tensors, metadata = mx.load(str(path), return_metadata=True)
    return _parse(tensors, metadata or {}, config, str(path))


def load_adapter(path: str | Path) -> Adapter:
    """Read a PEFT folder (with its `text_encoder/` folder, if any), a diffusers or kohya `.safetensors`
    file, or a folder holding one."""
    path = Path(path).expanduser()
    config = None
    if path.is_dir():
        for name in (PEFT_WEIGHTS, DIFFUSERS_WEIGHTS, KOHYA_WEIGHTS):
            if (path / name).exists():
                if name == PEFT_WEIGHTS and (path / PEFT_CONFIG).exists():
                    config = _read_peft_config(path / PEFT_CONFIG)
                path = path / name
                break
        else:
            files = sorted(path.glob("*.safetensors"))
            if len(files) != 1:
                raise AdapterError(f"{path}: expected {PEFT_WEIGHTS}, {DIFFUSERS_WEIGHTS} or one .safetensors file")
            path = files[0]
    elif path.name == PEFT_WEIGHTS and (path.parent / PEFT_CONFIG).exists():
        config = _read_peft_config(path.parent / PEFT_CONFIG)
    adapter = _read(path, config)
    te_file = path.parent / TEXT_ENCODER_DIR / PEFT_WEIGHTS
    if path.name == PEFT_WEIGHTS and te_file.exists():  # PEFT keeps the text encoder in a folder of its own
        te_config = te_file.parent / PEFT_CONFIG
        te = _read(te_file, _read_peft_config(te_config) if te_config.exists() else None)
        if te.A or te.text_encoder is None:
            raise AdapterError(f"{te_file}: expected the text encoder's LoRA (CLIP paths encoder.layers.N...)")
        if adapter.text_encoder is not None:
            raise AdapterError(f"{path}: text-encoder LoRA both in the file and in {te_file}; keep one")
        adapter.text_encoder = te.text_encoder
    return adapter


def resolve(adapter: Adapter, model: nn.Module, what: str = "UNet") -> Adapter:
    """Map the adapter's keys onto `model`'s module paths; refuse anything that does not fit."""
    modules = dict(model.named_modules())
    linear = {}
    for p, m in modules.items():
        if isinstance(m, LoRALinear):
            linear[p] = m.base_layer
        elif isinstance(m, nn.Linear) and not p.endswith(".base_layer"):
            linear[p] = m
    by_underscore = {p.replace(".", "_"): p for p in linear}
    mapping, missing, shapes = {}, [], []
    for k in adapter.A:
        p = k if k in linear else by_underscore.get(k.replace(".", "_"))
        if p is None:
            missing.append(kohya_name(k, what != "UNet") if "." not in k else k)
            continue
        w = linear[p].weight
        a, b = adapter.A[k], adapter.B[k]
        if (a.ndim != 2 or b.ndim != 2 or a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0]
                or a.shape[0] != b.shape[1]):
            shapes.append(f"{p}: A {tuple(a.shape)}, B {tuple(b.shape)} vs weight {tuple(w.shape)}")
        mapping[k] = p
    if missing or shapes:
        lines = [f"{adapter.source or 'adapter'} does not fit this {what} (another architecture?):"]
        lines += [f"  no such module: {k}" for k in missing[:50]]
        lines += [f"  wrong shape: {s}" for s in shapes[:50]]
        n = len(missing) + len(shapes)
        if n > 100:
            lines.append(f"  ({n} problems in all)")
        raise AdapterError("\n".join(lines))
    return Adapter({mapping[k]: v for k, v in adapter.A.items()}, {mapping[k]: v for k, v in adapter.B.items()},
                   {mapping[k]: v for k, v in adapter.alpha.items()}, adapter.metadata, adapter.source,
                   adapter.text_encoder)


def _parts(adapter: Adapter, model: nn.Module, text_encoder: nn.Module | None, use: str):
    """[(model, resolved part)] for the UNet and, if the adapter has one, the text encoder; all checked first."""
    parts = [(model, resolve(adapter, model))] if adapter.A else []
    te = adapter.text_encoder
    if te is not None and te.A:
        if text_encoder is None:
            raise AdapterError(f"{adapter.source or 'adapter'} holds a text-encoder LoRA ({len(te.A)} modules); "
                               f"{use}")
        parts.append((text_encoder, resolve(te, text_encoder, "text encoder")))
    return parts


def apply_adapter(model: nn.Module, adapter: Adapter, scale: float = 1.0,
                  text_encoder: nn.Module | None = None) -> int:
    """Add `scale * (alpha/r) * B @ A` into the base weights (for generation; stack several).

    The text-encoder part goes into `text_encoder`, which must then be given. Returns the number of
    modules changed; nothing changes unless every module fits.
    """
    parts = _parts(adapter, model, text_encoder, "give the text encoder to apply it to")
    for target, part in parts:
        modules = dict(target.named_modules())
        for p in part.A:
            m = modules[p]
            lin = m.base_layer if isinstance(m, LoRALinear) else m
            delta = (scale * part.scale(p)) * (part.B[p].astype(mx.float32) @ part.A[p].astype(mx.float32))
            lin.weight = (lin.weight.astype(mx.float32) + delta).astype(lin.weight.dtype)
        mx.eval(target.parameters())
    return sum(len(part.A) for _, part in parts)


def load_into_lora_layers(model: nn.Module, adapter: Adapter, text_encoder: nn.Module | None = None) -> None:
    """Set an injected model's LoRA weights from `adapter` (start or continue training from it); with
    `text_encoder`, its LoRA layers too. Every layer gets weights, or nothing changes."""
    trains_text = text_encoder is not None and bool(lora_layers(text_encoder))
    if trains_text and adapter.text_encoder is None:
        raise AdapterError(f"{adapter.source or 'adapter'} has no text-encoder LoRA to load into the text encoder")
    parts = _parts(adapter, model, text_encoder if trains_text else None,
                   "train the text encoder too (its LoRA layers are missing)")
    if not adapter.A:  # the UNet's layers are checked even against an adapter without a UNet part
        parts.insert(0, (model, adapter))
    for target, part in parts:
        layers = lora_layers(target)
        missing = sorted(set(layers) - set(part.A))
        extra = sorted(set(part.A) - set(layers))
        wrong = [f"{p}: adapter r={part.rank(p)}, alpha={part.alpha[p]} "
                 f"vs layer r={layers[p].r}, alpha={layers[p].alpha}"
                 for p in set(layers) & set(part.A)
                 if part.rank(p) != layers[p].r or part.alpha[p] != layers[p].alpha]
        if missing or extra or wrong:
            lines = [f"{adapter.source or 'adapter'} does not match the injected LoRA layers:"]
            lines += [f"  no adapter weights for: {p}" for p in missing[:30]]
            lines += [f"  adapter module without a LoRA layer (check the LoRA targets): {p}" for p in extra[:30]]
            lines += [f"  rank/alpha mismatch: {w}" for w in sorted(wrong)[:30]]
            raise AdapterError("\n".join(lines))
    for target, part in parts:
        for p, layer in lora_layers(target).items():
            layer.lora_A.weight = part.A[p].astype(layer.lora_A.weight.dtype)
            layer.lora_B.weight = part.B[p].astype(layer.lora_B.weight.dtype)
