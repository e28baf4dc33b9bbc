"""Writing adapters: `export_adapter` (PEFT folder, diffusers and kohya files, described in
`lora.formats`) and `save_fused_model` (a converted model folder with the adapters fused in).
Every file is written atomically.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_sd.io import atomic_file, atomic_folder, write_text

from .formats import (
    DIFFUSERS_WEIGHTS,
    FORMATS,
    KOHYA_WEIGHTS,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    TEXT_ENCODER_DIR,
    TEXT_PREFIX,
    Adapter,
    AdapterError,
    kohya_name,
)
from .layers import lora_layers


def _majority(values) -> float:
    return Counter(values).most_common(1)[0][0]


def _peft_config(adapter: Adapter, text: bool = False) -> dict:
    """`text`: the text encoder's part, whose PEFT paths have no `text_model.` (transformers >= 5)."""
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
        # Escaped full paths, so PEFT's `(.*\.)?key$` match hits exactly one module (for CLIP, in
        # either transformers layout).
        "rank_pattern": {re.escape(_peft_key(k, text)): int(v) for k, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(_peft_key(k, text)): v for k, v in adapter.alpha.items() if v != alpha},
    }


def _peft_key(path: str, text: bool) -> str:
    return path.removeprefix(TEXT_PREFIX) if text else path


def _str_metadata(adapter: Adapter) -> dict[str, str]:
    return {f"mlx_sd.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in adapter.metadata.items()}


def _save(path: Path, tensors: dict[str, mx.array], metadata: dict[str, str]) -> None:
    with atomic_file(path) as tmp:
        mx.save_safetensors(str(tmp), {k: v.astype(mx.float32) for k, v in tensors.items()}, metadata=metadata)


_LORA_CONFIG_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "init_lora_weights", "bias", "use_rslora",
                       "use_dora", "rank_pattern", "alpha_pattern")


def _write_peft(adapter: Adapter, folder: Path, meta: dict[str, str], text: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    t = {}
    for k in adapter.A:
        t[f"base_model.model.{_peft_key(k, text)}.lora_A.weight"] = adapter.A[k]
        t[f"base_model.model.{_peft_key(k, text)}.lora_B.weight"] = adapter.B[k]
    _save(folder / PEFT_WEIGHTS, t, meta)
    write_text(folder / PEFT_CONFIG, json.dumps(_peft_config(adapter, text), indent=2) + "\n")
    return folder / PEFT_WEIGHTS


def export_adapter(adapter: Adapter, out_dir: str | Path, formats=FORMATS) -> dict[str, Path]:
    """Write the adapter in each of `formats` into `out_dir`; returns format -> file.

    A text-encoder part goes into the same diffusers and kohya files, and into the PEFT folder
    `out_dir/text_encoder/` (format key "peft_text_encoder" in the result).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise AdapterError(f"unknown adapter formats {sorted(unknown)}; choose from {FORMATS}")
    te = adapter.text_encoder
    parts = [("unet", adapter, False)] + ([("text_encoder", te, True)] if te is not None and te.A else [])
    meta = {"format": "pt", **_str_metadata(adapter)}
    written = {}
    if "peft" in formats:
        written["peft"] = _write_peft(adapter, out_dir, meta)
        if te is not None and te.A:
            written["peft_text_encoder"] = _write_peft(te, out_dir / TEXT_ENCODER_DIR, meta, text=True)
        elif (out_dir / TEXT_ENCODER_DIR / PEFT_WEIGHTS).exists():  # an older export's: not this adapter's
            shutil.rmtree(out_dir / TEXT_ENCODER_DIR)
    if "diffusers" in formats:
        t, lora_meta = {}, {}
        for prefix, part, text in parts:
            for k in part.A:
                t[f"{prefix}.{k}.lora_A.weight"] = part.A[k]
                t[f"{prefix}.{k}.lora_B.weight"] = part.B[k]
            cfg = _peft_config(part, text)
            lora_meta.update({f"{prefix}.{k}": cfg[k] for k in _LORA_CONFIG_FIELDS})
        _save(out_dir / DIFFUSERS_WEIGHTS, t, {**meta, "lora_adapter_metadata": json.dumps(lora_meta, sort_keys=True)})
        written["diffusers"] = out_dir / DIFFUSERS_WEIGHTS
    if "kohya" in formats:
        t = {}
        for _, part, text in parts:
            for k in part.A:
                name = kohya_name(k, text)
                t[f"{name}.lora_down.weight"] = part.A[k]
                t[f"{name}.lora_up.weight"] = part.B[k]
                t[f"{name}.alpha"] = mx.array(part.alpha[k], dtype=mx.float32)
        cfg = _peft_config(adapter)
        kmeta = {**meta, "ss_network_module": "networks.lora", "ss_network_dim": str(cfg["r"]),
                 "ss_network_alpha": str(cfg["lora_alpha"]), "ss_base_model_version": "sd_v1"}
        for ours, theirs in (("learning_rate", "ss_unet_lr"), ("text_encoder_lr", "ss_text_encoder_lr")):
            if ours in adapter.metadata:
                kmeta[theirs] = str(adapter.metadata[ours])
        if "steps" in adapter.metadata:
            kmeta["ss_steps"] = str(adapter.metadata["steps"])
        _save(out_dir / KOHYA_WEIGHTS, t, kmeta)
        written["kohya"] = out_dir / KOHYA_WEIGHTS
    return written


def save_fused_model(src_folder: str | Path, unet: nn.Module, out_dir: str | Path,
                     text_encoder: nn.Module | None = None) -> Path:
    """Write a full converted model folder whose UNet (and, if given, text encoder) has the adapter(s)
    fused in (atomically). LoRA layers still in the models are fused in place first."""
    from mlx.utils import tree_flatten

    from mlx_sd.model_folder import MARKER, ModelFolder

    from .layers import fuse_lora

    src = ModelFolder(src_folder).path
    fused = {"unet": unet, "text_encoder": text_encoder} if text_encoder is not None else {"unet": unet}
    for model in fused.values():
        if lora_layers(model):
            fuse_lora(model)

    out_dir = Path(out_dir)
    with atomic_folder(out_dir) as tmp:
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("model.safetensors", MARKER), dirs_exist_ok=True)
        for comp in ("text_encoder", "vae"):
            if comp not in fused:
                shutil.copyfile(src / comp / "model.safetensors", tmp / comp / "model.safetensors")
        for comp, model in fused.items():
            mx.save_safetensors(str(tmp / comp / "model.safetensors"), dict(tree_flatten(model.parameters())),
                                metadata={"format": "mlx"})
        info = json.loads((src / MARKER).read_text())
        info["fused_from"] = str(src)
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return out_dir
