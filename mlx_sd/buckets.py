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

Batching (`BucketPlan`) differs from kohya where a data-parallel run needs it: every global
micro-batch (--train_batch_size x ranks) comes from one bucket and has the full batch size. An
epoch shuffles each bucket's images (seeded by seed, epoch, bucket), splits them into batches,
fills the last batch of a bucket with the first images of the same bucket's order again (kohya
trains a smaller last batch instead), and shuffles the order of all batches. So every image is
seen at least once per epoch, an epoch has sum over buckets of ceil(n_k / batch) micro-batches,
and micro-batch c is a pure function of (seed, c): resume is exact and N ranks with batch b
train what one process with batch N*b trains.
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
        """The printed table: bucket, images, batches per epoch (and how many batch slots are refills)."""
        lines = [f"aspect-ratio buckets ({len(self.table)} used; global batch {batch}):",
                 f"  {'bucket (w x h)':>16} {'ratio':>6} {'images':>7} {'batches':>8}"]
        total = 0
        for k, (w, h) in enumerate(self.table):
            n = int((self.of == k).sum())
            nb = math.ceil(n / batch)
            total += nb
            refill = nb * batch - n
            lines.append(f"  {f'{w} x {h}':>16} {w / h:>6.2f} {n:>7} {nb:>8}" +
                         (f"  ({refill} image(s) of this bucket repeated to fill its last batch)" if refill else ""))
        lines.append(f"  {'total':>16} {'':>6} {len(self.of):>7} {total:>8} micro-batches per epoch")
        return lines


class BucketPlan:
    """Which samples make global micro-batch `c`: one bucket per batch; a pure function of the seed.

    The same interface as `mlx_sd.data.BatchPlan` (see the module docstring for the rules).
    """

    def __init__(self, bucket_of: np.ndarray, batch: int, seed: int, flip: bool):
        if len(bucket_of) == 0:
            raise DataError("no images to train on")
        self.n, self.batch, self.seed, self.flip = len(bucket_of), batch, seed, flip
        self.members = [np.flatnonzero(bucket_of == k) for k in range(int(bucket_of.max()) + 1)]
        self.per_epoch = sum(math.ceil(len(m) / batch) for m in self.members)
        self._epoch: tuple[int, np.ndarray] | None = None

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """[per_epoch, batch] sample indices of every micro-batch of `epoch`, in training order."""
        if self._epoch is not None and self._epoch[0] == epoch:
            return self._epoch[1]
        rows = []
        for k, m in enumerate(self.members):
            if not len(m):
                continue
            # Five numbers: no other draw of the run (flips, crops, noise) uses a key of that shape.
            order = m[np.random.default_rng([self.seed, epoch, k, 3, 3]).permutation(len(m))]
            nb = math.ceil(len(m) / self.batch)
            rows.append(np.resize(order, nb * self.batch).reshape(nb, self.batch))  # np.resize repeats order
        batches = np.concatenate(rows)
        batches = batches[np.random.default_rng([self.seed, epoch, 4, 4, 4, 4]).permutation(len(batches))]
        self._epoch = (epoch, batches)
        return batches

    def __call__(self, c: int) -> tuple[int, np.ndarray, np.ndarray]:
        """(epoch, sample indices, mirror flags) of global micro-batch `c`."""
        epoch, j = divmod(c, self.per_epoch)
        idx = self.epoch_batches(epoch)[j]
        return epoch, idx, mirror_flags(self.seed, epoch, j, self.batch, self.flip)

    def epoch_of(self, c: int) -> int:
        return c // self.per_epoch
