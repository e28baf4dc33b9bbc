"""Aspect-ratio buckets: train images at their own shape, batches of one shape each.

The semantics are kohya sd-scripts' (`--enable_bucket`):
- The bucket table holds (width, height) sizes in pixels, multiples of `step`, between `min_reso`
  and `max_reso` per side, of at most `resolution`^2 pixels: the square floor(resolution / step)
  * step, and for every width w = min_reso, min_reso + step, ... <= max_reso the tallest height
  h = min(max_reso, floor(resolution^2 / w / step) * step) with h >= min_reso, with (h, w) too.
- An image of size (w, h) goes to the bucket whose aspect ratio width / height is nearest to
  w / h (an image that already has a bucket's exact size goes to that bucket; ties go to the
  first bucket in (width, height) order). It is resized to cover the bucket and center-cropped
  (`mlx_sd.data.cover_crop`).

Batching (`BucketPlan`) follows kohya in that each device's micro-batch (--train_batch_size
images) comes from one bucket, and differs where exact resume and data-parallel runs need it:
an epoch shuffles each bucket's images (seeded by seed, epoch, bucket), splits them into groups
of the per-device batch, fills the last group of a bucket with the first images of the same
bucket's order again (kohya trains a smaller last batch instead), and shuffles the order of all
groups. The epochs' group orders follow one another as one stream, and update u's global batch
(per-device batch x ranks x accumulation) is the next ranks x accumulation groups of it: group g
of the update goes to micro-batch g // ranks on rank g % ranks. So every image is seen at least
once per epoch, and an update's images depend only on (seed, update, per-device batch, global
batch): 2 ranks with accumulation k train what 1 process with accumulation 2k trains, and a
checkpoint resumes with another number of ranks or accumulation as long as the per-device batch
and the global batch stay the same (another per-device batch regroups the buckets, so a resume
refuses it).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .data import DataError, mirror_flags, oriented_size


def bucket_sizes(resolution: int, min_reso: int = 256, max_reso: int = 1024, step: int = 64) -> list[tuple[int, int]]:
    """kohya's bucket table for a square `resolution`, sorted by (width, height)."""
    area = resolution * resolution
    square = resolution // step * step
    sizes = {(square, square)}
    for w in range(min_reso, max_reso + 1, step):
        h = min(max_reso, area // w // step * step)
        if h >= min_reso:
            sizes |= {(w, h), (h, w)}
    return sorted(sizes)


def nearest_bucket(size: tuple[int, int], table: list[tuple[int, int]]) -> int:
    """Index in `table` of the bucket for an image of `size` (w, h): its own size, else the nearest ratio."""
    if tuple(size) in table:
        return table.index(tuple(size))
    ratios = np.array([w / h for w, h in table])
    return int(np.abs(ratios - size[0] / size[1]).argmin())


def check_flags(resolution: int, min_reso: int, max_reso: int, step: int) -> str | None:
    """Why these bucket settings cannot work, or None (the model's own multiple is checked by train.py)."""
    if step % 8:
        return f"--bucket_reso_steps {step} is not a multiple of 8 (SD1.x needs a multiple of 64)"
    for name, v in (("--min_bucket_reso", min_reso), ("--max_bucket_reso", max_reso)):
        if v % step:
            return f"{name} {v} is not a multiple of --bucket_reso_steps {step}"
    if not min_reso <= resolution <= max_reso:
        return (f"--resolution {resolution} must lie between --min_bucket_reso {min_reso} and "
                f"--max_bucket_reso {max_reso}")
    return None


class Buckets:
    """The samples' bucket assignment: `table` (used buckets only, (w, h) sorted), `of` [N] indices."""

    def __init__(self, image_sizes: list[tuple[int, int]], resolution: int, min_reso: int, max_reso: int,
                 step: int):
        full = bucket_sizes(resolution, min_reso, max_reso, step)
        chosen = np.array([nearest_bucket(s, full) for s in image_sizes], np.int64)
        used = sorted(set(chosen.tolist()))
        self.table = [full[k] for k in used]
        self.of = np.searchsorted(np.array(used), chosen)
        self.image_sizes = [tuple(s) for s in image_sizes]

    @classmethod
    def of_files(cls, paths: list[Path], resolution: int, min_reso: int, max_reso: int, step: int) -> "Buckets":
        return cls([oriented_size(p) for p in paths], resolution, min_reso, max_reso, step)

    def sizes(self) -> list[tuple[int, int]]:
        """Each sample's bucket size (w, h)."""
        return [self.table[k] for k in self.of]

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(bucket of each sample [N], bucket sizes [K, 2]) as `mlx_sd.data.load_or_encode` takes them."""
        return self.of, np.array(self.table, np.int64)

    def describe(self, batch: int) -> list[str]:
        """The printed table for per-device batch `batch`: bucket, images, batches per epoch (and how many
        batch slots are refills)."""
        lines = [f"aspect-ratio buckets ({len(self.table)} used; batches of {batch} per device):",
                 f"  {'bucket (w x h)':>16} {'ratio':>6} {'images':>7} {'batches':>8}"]
        total = 0
        for k, (w, h) in enumerate(self.table):
            n = int((self.of == k).sum())
            nb = math.ceil(n / batch)
            total += nb
            refill = nb * batch - n
            lines.append(f"  {f'{w} x {h}':>16} {w / h:>6.2f} {n:>7} {nb:>8}" +
                         (f"  ({refill} image(s) of this bucket repeated to fill its last batch)" if refill else ""))
        lines.append(f"  {'total':>16} {'':>6} {len(self.of):>7} {total:>8} batches per epoch")
        return lines


class BucketPlan:
    """Which samples make global micro-batch `c`: one bucket per group of `group` (the per-device batch).

    The same interface as `mlx_sd.data.BatchPlan` (see the module docstring for the rules); `batch`
    (the global micro-batch, `group` x ranks) must be a multiple of `group`.
    """

    def __init__(self, bucket_of: np.ndarray, batch: int, seed: int, flip: bool, accum: int = 1,
                 group: int | None = None):
        if len(bucket_of) == 0:
            raise DataError("no images to train on")
        group = group or batch
        if batch % group:
            raise ValueError(f"global micro-batch {batch} is not a multiple of the per-device batch {group}")
        self.n, self.batch, self.seed, self.flip = len(bucket_of), batch, seed, flip
        self.accum, self.group = accum, group
        self.members = [np.flatnonzero(bucket_of == k) for k in range(int(bucket_of.max()) + 1)]
        self.groups_per_epoch = sum(math.ceil(len(m) / group) for m in self.members)
        self.epoch_samples = self.groups_per_epoch * group  # stream positions per epoch
        self._epoch: tuple[int, np.ndarray] | None = None

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """[groups_per_epoch, group] sample indices of every group of `epoch`, in training order."""
        if self._epoch is not None and self._epoch[0] == epoch:
            return self._epoch[1]
        rows = []
        for k, m in enumerate(self.members):
            if not len(m):
                continue
            # Five numbers: no other draw of the run (flips, crops, noise) uses a key of that shape.
            order = m[np.random.default_rng([self.seed, epoch, k, 3, 3]).permutation(len(m))]
            nb = math.ceil(len(m) / self.group)
            rows.append(np.resize(order, nb * self.group).reshape(nb, self.group))  # np.resize repeats order
        batches = np.concatenate(rows)
        batches = batches[np.random.default_rng([self.seed, epoch, 4, 4, 4, 4]).permutation(len(batches))]
        self._epoch = (epoch, batches)
        return batches

    def __call__(self, c: int) -> tuple[int, np.ndarray, np.ndarray]:
        """(epoch of its last sample, sample indices, mirror flags) of global micro-batch `c`."""
        s = c * self.batch + np.arange(self.batch)
        epochs, i = s // self.epoch_samples, s % self.epoch_samples
        tables = {int(e): self.epoch_batches(int(e)) for e in np.unique(epochs)}
        idx = np.array([tables[int(e)][j // self.group, j % self.group] for e, j in zip(epochs, i)], np.int64)
        return int(epochs[-1]), idx, mirror_flags(self.seed, epochs, i, self.flip)

    def epoch_of(self, c: int) -> int:
        return ((c + 1) * self.batch - 1) // self.epoch_samples

    def locate(self, c: int) -> tuple[int, int]:
        """(update, position of its first sample in the update's global batch) of global micro-batch `c`."""
        u, m = divmod(c, self.accum)
        return u, m * self.batch
