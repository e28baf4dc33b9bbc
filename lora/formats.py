"""Adapter files: export to, and import from, the formats other tools load.

- PEFT folder: `adapter_model.safetensors` (`base_model.model.<path>.lora_A.weight`, ...) +
  `adapter_config.json` (a LoraConfig), what `PeftModel.from_pretrained` reads.
- diffusers: `pytorch_lora_weights.safetensors` (`unet.<path>.lora_A.weight`, ...) with the
  LoraConfig fields, prefixed `unet.`, in the `lora_adapter_metadata` header entry; without
  it diffusers assumes alpha = r.
- kohya / A1111 / ComfyUI: `lora_unet_<path with _>.lora_down.weight` (A), `.lora_up.weight`
  (B) and a scalar `.alpha` per module.
Import also reads diffusers' older `lora.down/lora.up` and attention-processor namings.

An `Adapter` holds, per UNet module path, A (r, in), B (out, r) and alpha; the update it
applies is `W += scale * (alpha / r) * B @ A`.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_sd.errors import MlxSdError
from mlx_sd.io import atomic_file, atomic_folder, safetensors_problem, write_text

from .layers import LoRALinear, lora_layers

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS = "lora_kohya.safetensors"
FORMATS = ("peft", "diffusers", "kohya")


class AdapterError(MlxSdError, ValueError):
    pass


@dataclass
class Adapter:
    A: dict[str, mx.array]  # module path (or kohya underscore name until resolved) -> (r, in)
    B: dict[str, mx.array]  # -> (out, r)
    alpha: dict[str, float]
    metadata: dict = field(default_factory=dict)
    source: str = ""

    def rank(self, key: str) -> int:
        return int(self.A[key].shape[0])

    def scale(self, key: str) -> float:
        return self.alpha[key] / self.rank(key)



# ----------------------------------------------------------------------------- export


def adapter_from_model(model: nn.Module, metadata: dict | None = None) -> Adapter:
    layers = lora_layers(model)
    if not layers:
        raise AdapterError("the model has no LoRA layers to export")
    return Adapter(
        A={p: l.lora_A.weight for p, l in layers.items()},
        B={p: l.lora_B.weight for p, l in layers.items()},
        alpha={p: float(l.alpha) for p, l in layers.items()},
        metadata=dict(metadata or {}),
    )


def _majority(values) -> float:
    return Counter(values).most_common(1)[0][0]


def _peft_config(adapter: Adapter) -> dict:
    ranks = {k: adapter.rank(k) for k in adapter.A}
    r = _majority(ranks.values())
    alpha = _majority(adapter.alpha.values())
    targets = sorted({("to_out.0" if k.endswith(".to_out.0") else k.rsplit(".", 1)[-1]) for k in adapter.A})
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": adapter.metadata.get("base_model"),
        "r": int(r),
        "lora_alpha": alpha,
        "lora_dropout": float(adapter.metadata.get("dropout", 0.0)),
        "target_modules": targets,
        "init_lora_weights": adapter.metadata.get("init", "gaussian"),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        # Escaped full paths, so PEFT's `(.*\.)?key$` match hits exactly one module.
        "rank_pattern": {re.escape(k): int(v) for k, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(k): v for k, v in adapter.alpha.items() if v != alpha},
    }


def _str_metadata(adapter: Adapter) -> dict[str, str]:
    return {f"mlx_sd.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in adapter.metadata.items()}


def _save(path: Path, tensors: dict[str, mx.array], metadata: dict[str, str]) -> None:
    with atomic_file(path) as tmp:
        mx.save_safetensors(str(tmp), {k: v.astype(mx.float32) for k, v in tensors.items()}, metadata=metadata)


def kohya_name(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def export_adapter(adapter: Adapter, out_dir: str | Path, formats=FORMATS) -> dict[str, Path]:
    """Write the adapter in each of `formats` into `out_dir`; returns format -> file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise AdapterError(f"unknown adapter formats {sorted(unknown)}; choose from {FORMATS}")
    cfg = _peft_config(adapter)
    meta = {"format": "pt", **_str_metadata(adapter)}
    written = {}
    if "peft" in formats:
        t = {}
        for k in adapter.A:
            t[f"base_model.model.{k}.lora_A.weight"] = adapter.A[k]
            t[f"base_model.model.{k}.lora_B.weight"] = adapter.B[k]
        _save(out_dir / PEFT_WEIGHTS, t, meta)
        write_text(out_dir / PEFT_CONFIG, json.dumps(cfg, indent=2) + "\n")
        written["peft"] = out_dir / PEFT_WEIGHTS
    if "diffusers" in formats:
        t = {}
        for k in adapter.A:
            t[f"unet.{k}.lora_A.weight"] = adapter.A[k]
            t[f"unet.{k}.lora_B.weight"] = adapter.B[k]
        lora_meta = {f"unet.{k}": v for k, v in cfg.items()
                     if k in ("r", "lora_alpha", "lora_dropout", "target_modules", "init_lora_weights",
                              "bias", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern")}
        _save(out_dir / DIFFUSERS_WEIGHTS, t, {**meta, "lora_adapter_metadata": json.dumps(lora_meta, sort_keys=True)})
        written["diffusers"] = out_dir / DIFFUSERS_WEIGHTS
    if "kohya" in formats:
        t = {}
        for k in adapter.A:
            name = kohya_name(k)
            t[f"{name}.lora_down.weight"] = adapter.A[k]
            t[f"{name}.lora_up.weight"] = adapter.B[k]
            t[f"{name}.alpha"] = mx.array(adapter.alpha[k], dtype=mx.float32)
        kmeta = {**meta, "ss_network_module": "networks.lora", "ss_network_dim": str(cfg["r"]),
                 "ss_network_alpha": str(cfg["lora_alpha"]), "ss_base_model_version": "sd_v1"}
        if "steps" in adapter.metadata:
            kmeta["ss_steps"] = str(adapter.metadata["steps"])
        _save(out_dir / KOHYA_WEIGHTS, t, kmeta)
        written["kohya"] = out_dir / KOHYA_WEIGHTS
    return written


# ----------------------------------------------------------------------------- import

_DIFFUSERS_OLD = re.compile(r"^(?:unet\.)?(.+)\.lora\.(down|up)\.weight$")
_PROCESSOR = re.compile(r"^(?:unet\.)?(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_LORA_AB = re.compile(r"^(.+)\.lora_(A|B)(?:\.default)?\.weight$")
_KOHYA = re.compile(r"^lora_unet_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")


def _pattern_value(patterns: dict, path: str, default):
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _parse(tensors: dict[str, mx.array], metadata: dict, config: dict | None, source: str) -> Adapter:
    A, B, alpha, bad = {}, {}, {}, []
    te = [k for k in tensors if k.startswith(("lora_te", "text_encoder.", "te_"))]
    if te:
        raise AdapterError(
            f"{source}: {len(te)} text-encoder LoRA tensors (e.g. {te[0]}); only UNet adapters are supported"
        )
    kohya_alpha = {}
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
    unpaired = sorted(set(A) ^ set(B))
    if bad or unpaired:
        lines = [f"{source}: not a UNet LoRA in a known format:"]
        if bad:
            lines += [f"  unrecognised key: {k}" for k in bad[:30]]
            lines += [f"  ... {len(bad) - 30} more"] if len(bad) > 30 else []
        if unpaired:
            lines += [f"  down/A without up/B (or the reverse): {k}" for k in unpaired[:30]]
        raise AdapterError("\n".join(lines))
    if not A:
        raise AdapterError(f"{source}: no LoRA tensors found")
    lora_meta = {}
    if "lora_adapter_metadata" in metadata:
        raw = json.loads(metadata["lora_adapter_metadata"])
        lora_meta = {k.removeprefix("unet."): v for k, v in raw.items() if k.startswith("unet.")}
    cfg = config or lora_meta
    for k in A:
        if k in kohya_alpha:
            alpha[k] = kohya_alpha[k]
        elif cfg.get("lora_alpha") is not None:
            alpha[k] = float(_pattern_value(cfg.get("alpha_pattern"), k, cfg["lora_alpha"]))
        else:  # what diffusers/PEFT assume without metadata
            alpha[k] = float(A[k].shape[0])
    ours = {k.removeprefix("mlx_sd."): v for k, v in metadata.items() if k.startswith("mlx_sd.")}
    for k, v in list(ours.items()):
        try:
            ours[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            pass
    return Adapter(A, B, alpha, metadata=ours, source=source)


def _read_peft_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path}: not a readable PEFT adapter config ({e}); export the adapter again") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: not a PEFT adapter config (expected a JSON object)")
    return config


def load_adapter(path: str | Path) -> Adapter:
    """Read a PEFT folder, a diffusers or kohya `.safetensors` file, or a folder holding one."""
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
    if not path.exists():
        raise AdapterError(f"{path}: adapter file not found")
    if path.suffix != ".safetensors":
        raise AdapterError(f"{path}: only .safetensors adapters are read (pickle files are not loaded)")
    if problem := safetensors_problem(path):
        raise AdapterError(f"{path}: cannot load this adapter: {problem}. Export it again, or use another copy.")
    tensors, metadata = mx.load(str(path), return_metadata=True)
    return _parse(tensors, metadata or {}, config, str(path))


def resolve(adapter: Adapter, model: nn.Module) -> Adapter:
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
            missing.append(kohya_name(k) if "." not in k else k)
            continue
        w = linear[p].weight
        a, b = adapter.A[k], adapter.B[k]
        if (a.ndim != 2 or b.ndim != 2 or a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0]
                or a.shape[0] != b.shape[1]):
            shapes.append(f"{p}: A {tuple(a.shape)}, B {tuple(b.shape)} vs weight {tuple(w.shape)}")
        mapping[k] = p
    if missing or shapes:
        lines = [f"{adapter.source or 'adapter'} does not fit this UNet (another architecture?):"]
        lines += [f"  no such module: {k}" for k in missing[:50]]
        lines += [f"  wrong shape: {s}" for s in shapes[:50]]
        n = len(missing) + len(shapes)
        if n > 100:
            lines.append(f"  ({n} problems in all)")
        raise AdapterError("\n".join(lines))
    return Adapter({mapping[k]: v for k, v in adapter.A.items()}, {mapping[k]: v for k, v in adapter.B.items()},
                   {mapping[k]: v for k, v in adapter.alpha.items()}, adapter.metadata, adapter.source)


def apply_adapter(model: nn.Module, adapter: Adapter, scale: float = 1.0) -> int:
    """Add `scale * (alpha/r) * B @ A` into the base weights (for generation; stack several)."""
    adapter = resolve(adapter, model)
    modules = dict(model.named_modules())
    for p in adapter.A:
        m = modules[p]
        lin = m.base_layer if isinstance(m, LoRALinear) else m
        delta = (scale * adapter.scale(p)) * (adapter.B[p].astype(mx.float32) @ adapter.A[p].astype(mx.float32))
        lin.weight = (lin.weight.astype(mx.float32) + delta).astype(lin.weight.dtype)
    mx.eval(model.parameters())
    return len(adapter.A)


def load_into_lora_layers(model: nn.Module, adapter: Adapter) -> None:
    """Set an injected model's LoRA weights from `adapter` (start or continue training from it)."""
    adapter = resolve(adapter, model)
    layers = lora_layers(model)
    missing = sorted(set(layers) - set(adapter.A))
    extra = sorted(set(adapter.A) - set(layers))
    wrong = [f"{p}: adapter r={adapter.rank(p)}, alpha={adapter.alpha[p]} "
             f"vs layer r={layers[p].r}, alpha={layers[p].alpha}"
             for p in set(layers) & set(adapter.A)
             if adapter.rank(p) != layers[p].r or adapter.alpha[p] != layers[p].alpha]
    if missing or extra or wrong:
        lines = [f"{adapter.source or 'adapter'} does not match the injected LoRA layers:"]
        lines += [f"  no adapter weights for: {p}" for p in missing[:30]]
        lines += [f"  adapter module without a LoRA layer (check --lora targets): {p}" for p in extra[:30]]
        lines += [f"  rank/alpha mismatch: {w}" for w in sorted(wrong)[:30]]
        raise AdapterError("\n".join(lines))
    for p, layer in layers.items():
        layer.lora_A.weight = adapter.A[p].astype(layer.lora_A.weight.dtype)
        layer.lora_B.weight = adapter.B[p].astype(layer.lora_B.weight.dtype)


def save_fused_model(src_folder: str | Path, unet: nn.Module, out_dir: str | Path) -> Path:
    """Write a full converted model folder whose UNet has the adapter(s) fused in (atomically).

    LoRA layers still in `unet` are fused in place first.
    """
    from mlx.utils import tree_flatten

    from mlx_sd.model_folder import MARKER, ModelFolder

    from .layers import fuse_lora

    src = ModelFolder(src_folder).path
    if lora_layers(unet):
        fuse_lora(unet)

    out_dir = Path(out_dir)
    with atomic_folder(out_dir) as tmp:
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("model.safetensors", MARKER), dirs_exist_ok=True)
        for comp in ("text_encoder", "vae"):
            shutil.copyfile(src / comp / "model.safetensors", tmp / comp / "model.safetensors")
        mx.save_safetensors(str(tmp / "unet" / "model.safetensors"), dict(tree_flatten(unet.parameters())),
                            metadata={"format": "mlx"})
        info = json.loads((src / MARKER).read_text())
        info["fused_from"] = str(src)
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return out_dir
