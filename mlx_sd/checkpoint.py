"""Training checkpoints: written whole or not at all, pruned only after the new one is complete.

`checkpoints/checkpoint-<step>/` holds
    adapter_model.safetensors + adapter_config.json   the LoRA (a PEFT folder: usable as is)
    optimizer.safetensors                             AdamW moments and step counter
    trainer_state.json                                step, data position, LR, run config
It is assembled in `.checkpoint-<step>.tmp-<pid>` and renamed into place; a folder named
`checkpoint-<step>` is therefore always complete. Randomness needs no saved state: every
micro-batch seeds MLX's generator from (seed, micro-batch index).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from mlx_sd.weights import set_by_path
from lora.formats import adapter_from_model, export_adapter, load_adapter, load_into_lora_layers

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
# Run settings that must agree for a resume to continue the same run.
# The batch settings fix which samples each step saw, so a resume must keep them too (the
# number of ranks may change as long as the global batch stays the same).
IDENTITY_KEYS = ("model", "lora_rank", "lora_alpha", "lora_targets", "resolution", "global_batch",
                 "gradient_accumulation_steps")


class CheckpointError(RuntimeError):
    pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def save_checkpoint(root: Path, step: int, unet: nn.Module, optimizer: optim.Optimizer, state: dict,
                    total_limit: int | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step}"
    tmp = root / f".checkpoint-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        meta = {"steps": step, "base_model": state["config"].get("model"), "init": "gaussian",
                "dropout": state["config"].get("lora_dropout", 0.0)}
        export_adapter(adapter_from_model(unet, meta), tmp, formats=("peft",))
        opt = dict(tree_flatten(optimizer.state))
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), opt)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # a re-save of the same step: move the old one out of the way first
            _discard(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if total_limit and total_limit > 0:
        for _, old in list_checkpoints(root)[:-total_limit]:
            _discard(old)
    for stale in root.glob(".checkpoint-*"):  # leftovers of killed saves and deletions
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    return final


def _discard(path: Path) -> None:
    """Rename first (atomic), then delete: a kill mid-delete leaves no half checkpoint behind."""
    trash = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def resolve_resume(arg: str, root: Path) -> Path | None:
    """`latest` -> newest complete checkpoint under `root` (None if there is none); else a path."""
    if arg == "latest":
        return latest_checkpoint(root)
    path = Path(arg).expanduser()
    if not (path / STATE_FILE).exists():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {STATE_FILE})")
    return path


def load_checkpoint(path: Path, unet: nn.Module, optimizer: optim.Optimizer, config: dict) -> dict:
    """Restore adapter and optimizer into the live objects; refuse a checkpoint of another run."""
    state = json.loads((path / STATE_FILE).read_text())
    saved = state.get("config", {})
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {config.get(k)!r}"
            for k in IDENTITY_KEYS if saved.get(k) != config.get(k)]
    if diff:
        raise CheckpointError(f"{path} belongs to a different run and cannot be resumed here:\n  "
                              + "\n  ".join(diff) + "\nStart a new --output_dir, or use the original settings.")
    load_into_lora_layers(unet, load_adapter(path))
    opt = mx.load(str(path / "optimizer.safetensors"))
    optimizer.init(unet.trainable_parameters())
    expected = dict(tree_flatten(optimizer.state))
    if set(opt) != set(expected):
        raise CheckpointError(f"{path / 'optimizer.safetensors'}: optimizer state does not match the LoRA layers "
                              f"({len(set(opt) ^ set(expected))} keys differ)")
    # In place: compiled train steps hold a reference to this very state tree.
    for key, value in opt.items():
        set_by_path(optimizer.state, key, value.astype(expected[key].dtype))
    mx.eval(unet.parameters(), optimizer.state)
    return state
