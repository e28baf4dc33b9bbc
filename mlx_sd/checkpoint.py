"""Training checkpoints: written whole or not at all, pruned only after the new one is complete.

`checkpoints/checkpoint-<step>/` holds
    adapter_model.safetensors + adapter_config.json   the LoRA (a PEFT folder: usable as is)
    optimizer.safetensors                             AdamW moments and step counter
    trainer_state.json                                step, data position, LR, run config
and, when the text encoder trains (--train_text_encoder),
    text_encoder/adapter_model.safetensors + ...      its LoRA (PEFT's folder for it)
    optimizer_text_encoder.safetensors                its AdamW state
It is assembled in `.checkpoint-<step>.tmp-<host>-<pid>` and renamed into place; a folder named
`checkpoint-<step>` is therefore always complete. Randomness needs no saved state: every draw
of a sample is keyed by (seed, update, its position in the update's global batch).
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

from mlx_sd.errors import MlxSdError
from mlx_sd.io import atomic_folder, discard, safetensors_problem
from mlx_sd.weights import set_by_path
from lora.export import export_adapter
from lora.formats import PEFT_WEIGHTS, TEXT_ENCODER_DIR, adapter_from_model, load_adapter, load_into_lora_layers

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
TEXT_OPTIMIZER = "optimizer_text_encoder.safetensors"
# A resume continues the same run: every setting saved in the checkpoint must agree, except these,
# which do not change the trained weights (paths, display, when to save or render, memory, and how
# the global batch is split into ranks, per-device batches and accumulation steps: `global_batch`,
# and `bucket_batch` with aspect-ratio buckets, are compared instead).
RESULT_NEUTRAL = frozenset({
    "config", "pretrained_model_name_or_path", "model_dir", "train_data_dir", "output_dir", "resume_from_checkpoint",
    "overwrite", "no_progress", "report_to", "check", "memory_limit_gb", "gradient_checkpointing", "world_size",
    "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "checkpoints_total_limit",
    "validation_steps", "validation_prompts",
    "num_validation_images", "validation_inference_steps", "validation_sampler", "validation_guidance_scale",
    "no_validation", "save_fused_pipeline", "skip_nan_steps", "strict_data",
})
# The run's length may change on resume ("train for more steps"): the LR schedule is then the one of
# the new length evaluated from the checkpoint's step on, as diffusers' and kohya's scripts rebuild it.
RUN_LENGTH = frozenset({"max_train_steps", "num_train_epochs"})


class CheckpointError(MlxSdError, RuntimeError):
    pass


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
                    total_limit: int | None = None, text_encoder: nn.Module | None = None,
                    text_optimizer: optim.Optimizer | None = None) -> Path:
    final = root / f"checkpoint-{step}"
    with atomic_folder(final, fsync=True) as tmp:
        meta = {"steps": step, "base_model": state["config"].get("model"), "init": "gaussian",
                "dropout": state["config"].get("lora_dropout", 0.0)}
        export_adapter(adapter_from_model(unet, meta, text_encoder), tmp, formats=("peft",))
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        if text_encoder is not None:
            mx.save_safetensors(str(tmp / TEXT_OPTIMIZER), dict(tree_flatten(text_optimizer.state)))
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    if total_limit and total_limit > 0:
        for _, old in list_checkpoints(root)[:-total_limit]:
            discard(old)
    for stale in root.glob(".checkpoint-*"):  # leftovers of killed saves and deletions
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    return final


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint folder `path` cannot be resumed from (unreadable state, truncated files); None if whole."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except FileNotFoundError:
        return f"no {STATE_FILE}"
    except (OSError, ValueError) as e:
        return f"{STATE_FILE} is not readable JSON ({e})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or state["step"] < 0:
        return f"{STATE_FILE} has no step number (expected an object with \"step\": N)"
    names = ["adapter_model.safetensors", "optimizer.safetensors"]
    if _trains_text(path):
        names += [f"{TEXT_ENCODER_DIR}/{PEFT_WEIGHTS}", TEXT_OPTIMIZER]
    for name in names:
        if not (path / name).exists():
            return f"{name} is missing"
        if problem := safetensors_problem(path / name):
            return f"{name}: {problem}"
    return None


def resolve_resume(arg: str, root: Path, warn=print) -> Path | None:
    """`latest` -> the newest complete and readable checkpoint under `root` (None if there is none);
    otherwise the checkpoint folder `arg`, which must be complete and readable."""
    if arg == "latest":
        for _, path in reversed(list_checkpoints(root)):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            warn(f"skipping {path}: {problem}")
        return None
    path = Path(arg).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"--resume_from_checkpoint {arg}: no such checkpoint folder "
                              f"(or 'latest' for the newest in {root})")
    if problem := checkpoint_problem(path):
        raise CheckpointError(f"{path}: cannot resume from it: {problem}. Resume from an earlier checkpoint, "
                              "or 'latest' for the newest readable one.")
    return path


def _trains_text(path: Path) -> bool:
    return (path / TEXT_ENCODER_DIR).is_dir() or (path / TEXT_OPTIMIZER).exists()


def load_checkpoint(path: Path, unet: nn.Module, optimizer: optim.Optimizer, config: dict,
                    text_encoder: nn.Module | None = None, text_optimizer: optim.Optimizer | None = None) -> dict:
    """Restore adapter and optimizer (and the text encoder's, when it trains) into the live objects;
    refuse a checkpoint of another run. A different run length (RUN_LENGTH) is allowed: `length_change`
    says what changed."""
    if problem := checkpoint_problem(path):
        raise CheckpointError(f"{path}: cannot resume from it: {problem}")
    if _trains_text(path) != (text_encoder is not None):
        had, now = ("with", "without") if text_encoder is None else ("without", "with")
        raise CheckpointError(f"{path} was trained {had} --train_text_encoder and this run is {now} it: the "
                              f"text encoder's LoRA {'would be lost' if had == 'with' else 'has nothing to resume'}. "
                              "Resume with the original setting, or start a new --output_dir.")
    state = json.loads((path / STATE_FILE).read_text())
    saved = state.get("config", {})
    keys = sorted(k for k in set(saved) & set(config) if k not in RESULT_NEUTRAL | RUN_LENGTH)
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {config.get(k)!r}" for k in keys if saved.get(k) != config.get(k)]
    if diff:
        raise CheckpointError(f"{path} belongs to a different run and cannot be resumed here:\n  "
                              + "\n  ".join(diff) + "\nStart a new --output_dir, or use the original settings.")
    try:
        load_into_lora_layers(unet, load_adapter(path), text_encoder)
    except MlxSdError as e:
        raise CheckpointError(f"{path}: {e}") from None
    _load_optimizer(path / "optimizer.safetensors", unet, optimizer)
    if text_encoder is not None:
        _load_optimizer(path / TEXT_OPTIMIZER, text_encoder, text_optimizer)
    mx.eval(unet.parameters(), optimizer.state)
    if text_encoder is not None:
        mx.eval(text_encoder.parameters(), text_optimizer.state)
    return state


def _load_optimizer(file: Path, model: nn.Module, optimizer: optim.Optimizer) -> None:
    opt = mx.load(str(file))
    optimizer.init(model.trainable_parameters())
    expected = dict(tree_flatten(optimizer.state))
    if set(opt) != set(expected):
        raise CheckpointError(f"{file}: optimizer state does not match the LoRA layers "
                              f"({len(set(opt) ^ set(expected))} keys differ)")
    # In place: compiled train steps hold a reference to this very state tree.
    for key, value in opt.items():
        set_by_path(optimizer.state, key, value.astype(expected[key].dtype))


def length_change(state: dict, config: dict) -> dict[str, tuple]:
    """The run-length settings (RUN_LENGTH) whose value differs between checkpoint `state` and `config`."""
    saved = state.get("config", {})
    return {k: (saved.get(k), config.get(k)) for k in sorted(RUN_LENGTH)
            if k in saved and saved.get(k) != config.get(k)}
