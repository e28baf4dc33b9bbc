"""Data-parallel training on several processes or Macs, over MLX's own `mx.distributed`.

`mlx.launch` starts one process per rank (ring backend over Ethernet/Thunderbolt, MPI, JACCL);
nothing here opens a socket. The work is split so that N ranks with batch b and accumulation k
compute what one process computes with any other split of the same global batch N*b*k (one
process at batch b x accumulation N*k, for instance), up to float32 summation order:

- Global micro-batch c holds N*b samples (`mlx_sd.data.BatchPlan`); rank r takes rows [r*b, (r+1)*b).
  Micro-batch m of rank r holds positions m*N*b + r*b + j of update u's global batch, and the
  sample at position p is fixed by (seed, u, p) for any split (with aspect-ratio buckets, for
  any split with the same b: `mlx_sd.buckets`).
- Every random draw of a sample (latent sample, noise, timestep, LoRA dropout masks, flip, crop,
  caption variant) is fixed by (seed, update, position), never by the rank, the micro-batch or
  the number of ranks (`mlx_sd.training.sample_keys`).
- Gradients are averaged once per update inside the compiled `apply_update`; the loss reported is
  the global mean (`World.mean`), so every rank takes the same branch on a non-finite loss.
- At start-up the ranks compare digests of their code, run settings, dataset and model
  (`check_same_run`), then rank 0's adapter and optimizer state (fresh, or resumed from its
  checkpoint) replace every other rank's (`share_training_state`): only rank 0 needs checkpoints.
Only rank 0 writes logs, checkpoints, validation images and the adapter.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .errors import MlxSdError
from .weights import set_by_path

# How MLX's backends word their errors ("[ring] connection to a peer was lost", ...).
_BACKEND_ERROR = re.compile(r"^\[(ring|jaccl|mpi|nccl)\]")
_PACKAGES = ("mlx_sd", "lora")


class DistributedError(MlxSdError, RuntimeError):
    pass


@dataclass(frozen=True)
class World:
    group: mx.distributed.Group
    rank: int
    size: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def tag(self) -> str:
        """Prefix for messages, so that interleaved output says which rank speaks."""
        return f"rank {self.rank}: " if self.size > 1 else ""

    def mean(self, value: float) -> float:
        """The mean of `value` over the ranks (float32 on the wire; NaN anywhere gives NaN)."""
        if self.size == 1:
            return value
        return mx.distributed.all_sum(mx.array([value], mx.float32), group=self.group).item() / self.size

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any: ranks agree to stop at the same step."""
        if self.size == 1:
            return flag
        return mx.distributed.all_sum(mx.array([int(flag)], mx.int32), group=self.group).item() > 0

    def barrier(self) -> None:
        """Return once every rank got here."""
        self.any(False)

    def broadcast(self, tree):
        """Rank 0's arrays on every rank: a sum to which the other ranks add zeros (x + 0 == x)."""
        if self.size == 1:
            return tree
        out = [(k, mx.distributed.all_sum(v if self.main else mx.zeros_like(v), group=self.group))
               for k, v in tree_flatten(tree)]
        mx.eval([v for _, v in out])
        return tree_unflatten(out)

    def lost(self, error: BaseException) -> str | None:
        """If `error` is the backend reporting a failed peer, say so (naming it where we can)."""
        if self.size == 1 or not isinstance(error, RuntimeError) or not _BACKEND_ERROR.match(str(error)):
            return None
        who = (f"rank {1 - self.rank}" if self.size == 2
               else "another rank (mlx.launch's '[WARN] Node with rank N' line names it)")
        return f"lost the connection to {who}: it failed, was killed or disconnected ({error})"


def init() -> World:
    """The launched group (size 1 when started without mlx.launch)."""
    group = mx.distributed.init()
    return World(group, group.rank(), group.size())


# ----------------------------------------------------------------------------- start-up checks


def digest(*parts) -> bytes:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.digest()[:8]


def code_digest(script: Path) -> bytes:
    """The training script, every module of mlx_sd and lora, and the MLX version."""
    root = Path(__file__).resolve().parent.parent
    files = sorted(f.relative_to(root) for pkg in _PACKAGES for f in (root / pkg).rglob("*.py"))
    return digest(mx.__version__, Path(script).read_bytes(), *(x for f in files for x in (f, (root / f).read_bytes())))


def data_digest(samples) -> bytes:
    """File names, sizes and captions (not times: a copied dataset has other mtimes)."""
    return digest(*(f"{s.path.name}\0{s.path.stat().st_size}\0{s.caption}" for s in samples))


def model_digest(folder: Path, sample: int = 1 << 20) -> bytes:
    """Configs, sizes and three 1 MiB slices of each weights file: different weights differ there
    too, and reading 4 GB on every start would not be worth it."""
    parts = []
    for name in ("unet", "vae", "text_encoder"):
        parts.append((folder / name / "config.json").read_bytes())
        weights = folder / name / "model.safetensors"
        size = weights.stat().st_size
        parts.append(size)
        with open(weights, "rb") as f:
            for at in (0, max(0, size // 2 - sample // 2), max(0, size - sample)):
                f.seek(at)
                parts.append(f.read(sample))
    return digest(*parts)


def _gather(world: World, digests: list[bytes]) -> np.ndarray:
    """[size, len(digests)] rows of uint64 digests, one row per rank (all_gather of uint32 halves)."""
    local = np.frombuffer(b"".join(digests), dtype=np.uint32).copy()
    rows = np.array(mx.distributed.all_gather(mx.array(local), group=world.group))
    return rows.reshape(world.size, -1).view(np.uint64)


def check_same_run(world: World, code: bytes, data: bytes, model: bytes, settings: dict) -> None:
    """Every rank must run the same code, settings, dataset and model; say which rank differs in what."""
    if world.size == 1:
        return
    keys = sorted(settings)
    table = _gather(world, [code, data, model, digest(*(f"{k}={settings[k]!r}" for k in keys))])
    what = ("code (train.py, mlx_sd/, lora/ or the MLX version)", "dataset (file names, sizes or captions)",
            "model weights or configs", "run settings")
    differ = {r: [what[i] for i in range(len(what)) if table[r, i] != table[0, i]] for r in range(1, world.size)}
    differ = {r: d for r, d in differ.items() if d}
    if not differ:
        return
    keys_differ = set()
    if not (table[:, 0] != table[0, 0]).any():  # same code, hence the same flags: find which values differ
        per_key = _gather(world, [digest(f"{k}={settings[k]!r}") for k in keys])
        keys_differ = {keys[i] for i in np.nonzero((per_key != per_key[0]).any(axis=0))[0]}
    lines = [f"rank {r} differs from rank 0 in its {', '.join(d)}" for r, d in sorted(differ.items())]
    if keys_differ:
        mine = ", ".join(f"{k}={settings[k]!r}" for k in sorted(keys_differ))
        lines.append(f"settings that differ: {', '.join(sorted(keys_differ))} (on rank {world.rank}: {mine})")
    raise DistributedError("the ranks are not running the same training:\n  " + "\n  ".join(lines)
                           + "\nEvery rank must run the same train.py command with the same code, --config file, "
                           "dataset and model; nothing was trained.")


def share_training_state(world: World, unet, optimizer, step: int) -> int:
    """Give every rank rank 0's LoRA weights, optimizer state and step; returns the step."""
    if world.size == 1:
        return step
    optimizer.init(unet.trainable_parameters())  # the same tree on every rank (no-op where loaded)
    unet.update(world.broadcast(unet.trainable_parameters()))
    # In place: keep the very state tree a compiled step may hold.
    for key, value in tree_flatten(world.broadcast(optimizer.state)):
        set_by_path(optimizer.state, key, value)
    return int(world.broadcast({"step": mx.array(step, mx.int32)})["step"].item())
