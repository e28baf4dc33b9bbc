"""Training data: caption files, up-front checks, preprocessing, latent/text caching, batching.

A dataset folder holds the images (in `images/`, `train/` or the folder itself) and their captions:
- `captions.json` as a mapping `{"file.png": "caption", ...}`, or a list of records
  `[{"file_name"|"image"|"file": ..., "text"|"caption": ...}, ...]`;
- `metadata.jsonl` (Hugging Face imagefolder): one `{"file_name": ..., "text": ...}` per line
  (--image_column / --caption_column name other keys);
- or a caption file beside each image, kohya's layout: `a.png` + `a.txt` (or --caption_extension).
Pixels are NHWC float32 in [-1, 1]. Latents are NHWC, unscaled (VAE mean/std before the
scaling factor is applied).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import MlxSdError
from .logs import FILE_ONLY
from .io import atomic_file

logger = logging.getLogger(__name__)

CAPTION_FILES = ("captions.json", "metadata.jsonl")
SIDECAR_EXTENSIONS = (".txt", ".caption")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
_FILE_KEYS = ("file_name", "image", "file", "filename", "path")
_TEXT_KEYS = ("text", "caption", "prompt")


class DataError(MlxSdError, ValueError):
    pass


@dataclass(frozen=True)
class Sample:
    path: Path
    caption: str


def _records_from_json(obj, source: Path, image_column: str | None = None,
                       caption_column: str | None = None) -> list[tuple[str, str]]:
    if isinstance(obj, dict):
        return [(str(k), v if isinstance(v, str) else "") for k, v in obj.items()]
    if not isinstance(obj, list):
        raise DataError(f"{source}: expected a mapping {{file: caption}} or a list of records")
    # An imagefolder's "image" column is its file_name key (as the datasets library reads it).
    file_keys = (image_column, "file_name") if image_column else _FILE_KEYS
    text_keys = (caption_column,) if caption_column else _TEXT_KEYS
    out = []
    for i, rec in enumerate(obj):
        if not isinstance(rec, dict):
            raise DataError(f"{source}: entry {i} is not an object with a file name and a caption")
        f = next((rec[k] for k in file_keys if k in rec), None)
        if f is None:
            raise DataError(f"{source}: entry {i} has no file name (one of {', '.join(file_keys)}; keys present: "
                            f"{', '.join(rec) or 'none'})" + ("; check --image_column" if image_column else ""))
        if caption_column and caption_column not in rec:
            raise DataError(f"{source}: entry {i} has no {caption_column!r} column (--caption_column); keys "
                            f"present: {', '.join(rec)}")
        t = next((rec[k] for k in text_keys if k in rec), "")
        out.append((str(f), t if isinstance(t, str) else ""))
    return out


def _sidecar_records(images: Path, extension: str) -> list[tuple[str, str | None]]:
    """(image, caption) for every image in the folder with its caption file beside it, kohya's layout
    (`a.png` + `a.txt`); the caption is the file's first non-empty line, None when the file is missing."""
    out = []
    for path in sorted(images.iterdir()):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
            continue
        cap = path.with_suffix(extension)
        text = None
        if cap.is_file():
            lines = [line.strip() for line in cap.read_text(encoding="utf-8", errors="replace").splitlines()]
            text = next((line for line in lines if line), "")
        out.append((path.name, text))
    return out


def read_captions(data_dir: str | Path, caption_extension: str | None = None, image_column: str | None = None,
                  caption_column: str | None = None) -> tuple[Path, list[tuple[str, str | None]]]:
    """Return (images folder, [(file name, caption)]) for a dataset folder.

    Looked for in the folder, its `images/` and its `train/` (a Hub imagefolder's split): captions.json,
    metadata.jsonl, then caption files beside the images (`.txt`, `.caption`). `caption_extension` reads
    only caption files with that extension. A caption is None where an image has no caption file.
    """
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: training data folder not found")
    folders = [f for f in (data_dir, data_dir / "images", data_dir / "train") if f.is_dir()]
    images = data_dir / "images" if (data_dir / "images").is_dir() else data_dir
    if caption_extension:
        ext = caption_extension if caption_extension.startswith(".") else "." + caption_extension
        for folder in folders:
            records = _sidecar_records(folder, ext)
            if any(text is not None for _, text in records):
                return folder, records
        raise DataError(f"{data_dir}: no image with a {ext} caption file beside it (--caption_extension {ext})")
    for folder in folders:
        cj, mj = folder / "captions.json", folder / "metadata.jsonl"
        if cj.exists():
            try:
                obj = json.loads(cj.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise DataError(f"{cj}: invalid JSON ({e})") from None
            return (images if folder == data_dir else folder), _records_from_json(obj, cj, image_column,
                                                                                   caption_column)
        if mj.exists():
            recs = []
            for n, line in enumerate(mj.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    recs += _records_from_json([json.loads(line)], Path(f"{mj}:{n}"), image_column, caption_column)
                except json.JSONDecodeError as e:
                    raise DataError(f"{mj} line {n}: invalid JSON ({e})") from None
            return (mj.parent, recs)
    for folder in folders:
        for ext in SIDECAR_EXTENSIONS:
            records = _sidecar_records(folder, ext)
            if any(text is not None for _, text in records):
                return folder, records
    raise DataError(f"{data_dir}: no captions: expected captions.json or metadata.jsonl (in the folder, images/ or "
                    "train/), or a caption file beside each image (a.png + a.txt; --caption_extension for others)")


def scan(data_dir: str | Path, strict: bool = False, caption_extension: str | None = None,
         image_column: str | None = None, caption_column: str | None = None) -> tuple[list[Sample], list[str]]:
    """Check every entry up front: file exists, decodes fully, caption not empty.

    Returns (usable samples, one message per skipped entry). With `strict`, any problem raises.
    The other arguments are `read_captions`'.
    """
    images, records = read_captions(data_dir, caption_extension, image_column, caption_column)
    good, problems = [], []
    seen: dict[str, str] = {}  # resolved file -> the name it was first listed under
    for name, caption in records:
        rel = os.path.normpath(name)
        if os.path.isabs(name) or rel == ".." or rel.startswith(".." + os.sep):
            problems.append(f"{name}: outside {images} (entries must name files inside the images folder)")
            continue
        path = images / rel
        key = str(path.resolve())
        if key in seen:
            first = seen[key]
            problems.append(f"{name}: listed twice (the first entry is used)" if first == name
                            else f"{name}: the same file as {first} (the first entry is used)")
            continue
        seen[key] = name
        if caption is None:
            problems.append(f"{name}: no caption file beside it ({Path(name).stem}.txt or --caption_extension)")
            continue
        if not caption.strip():
            problems.append(f"{name}: empty caption")
            continue
        if not path.is_file():
            problems.append(f"{name}: file not found in {images}")
            continue
        try:
            with Image.open(path) as im:
                im.load()  # full decode: catches truncated/corrupt files that open() accepts
        except Exception as e:
            problems.append(f"{name}: unreadable image ({type(e).__name__}: {e})")
            continue
        good.append(Sample(path, caption.strip()))
    if strict and problems:
        raise DataError(f"{len(problems)} problem(s) in {data_dir} (--strict_data):\n  " + "\n  ".join(problems))
    for p in problems:
        logger.warning("skipping %s", p, extra=FILE_ONLY)  # the caller shows or raises the problems
    if not good:
        raise DataError(f"{data_dir}: no usable images ({len(problems)} entries skipped)" +
                        ("".join(f"\n  {p}" for p in problems[:20])))
    return good, problems


def to_rgb(im: Image.Image) -> Image.Image:
    """Any mode -> RGB; transparency is composited on white (product photos are on white)."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("RGBA", "LA", "P", "PA") and ("transparency" in im.info or im.mode in ("RGBA", "LA", "PA")):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


def oriented_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels as `to_rgb` will see the image: EXIF rotations swap the sides."""
    with Image.open(path) as im:
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def cover_crop(size: tuple[int, int], target: tuple[int, int],
               rng: np.random.Generator | None = None) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Resize `size` (w, h) to cover `target` (w, h), keeping its aspect ratio, then crop to `target`.

    Returns (resized (w, h), crop box (left, top, right, bottom) in resized pixels): centered, or
    at random offsets drawn from `rng`.
    """
    (w, h), (tw, th) = size, target
    s = max(tw / w, th / h)
    nw, nh = max(tw, round(w * s)), max(th, round(h * s))
    if rng is None:
        left, top = (nw - tw) // 2, (nh - th) // 2
    else:
        left, top = int(rng.integers(0, nw - tw + 1)), int(rng.integers(0, nh - th + 1))
    return (nw, nh), (left, top, left + tw, top + th)


def preprocess(path: Path, resolution: int, center_crop: bool = True, flip: bool = False,
               rng: np.random.Generator | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
    """Image file -> [height, width, 3] float32 in [-1, 1]; `size` (w, h), or a square of `resolution`.

    Resized (bilinear, as the diffusers training scripts do) so it covers the size, then a center
    (or random) crop, optionally mirrored.
    """
    with Image.open(path) as im:
        im = to_rgb(im)
    resized, box = cover_crop(im.size, size or (resolution, resolution), None if center_crop else rng)
    im = im.resize(resized, Image.BILINEAR).crop(box)
    x = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return x[:, ::-1] if flip else x


def dataset_fingerprint(samples: list[Sample], *parts) -> str:
    """Content key for caches: file names, sizes, mtimes, captions and the settings given."""
    h = hashlib.sha256()
    for s in samples:
        st = s.path.stat()
        h.update(f"{s.path.name}\0{st.st_size}\0{st.st_mtime_ns}\0{s.caption}\n".encode())
    for p in parts:
        h.update(f"{p}\n".encode())
    return h.hexdigest()[:20]


# Generator keys of a run's per-sample draws. Each kind has a key no other kind can produce for any
# indices (captions.py's caption variants: [seed, update, position, 5, 5]), so no two draws are correlated.
# A training sample is named by (update, position in that update's global batch), never by micro-batch,
# rank or accumulation step, so that any split of the same global batch draws the same values.
def flip_key(seed: int, epoch: int, i: int) -> list[int]:
    """Whether the sample at position `i` of `epoch`'s order is mirrored."""
    return [seed, epoch, i, 1]


def mirror_flags(seed: int, epochs: np.ndarray, positions: np.ndarray, enabled: bool) -> np.ndarray:
    """Which of the samples at `positions` of `epochs`' orders are mirrored (each with probability 1/2;
    none if not `enabled`)."""
    if not enabled:
        return np.zeros(len(positions), bool)
    return np.array([np.random.default_rng(flip_key(seed, int(e), int(i))).random() < 0.5
                     for e, i in zip(epochs, positions)], bool)


def crop_key(seed: int, update: int, position: int) -> list[int]:
    """The random crop of the sample at `position` of update `update`'s global batch."""
    return [seed, update, 2, position, 2]


def step_key(seed: int, update: int, position: int) -> list[int]:
    """The train step's draws (noise, timestep, latent sample, LoRA dropout masks) for the sample at
    `position` of update `update`'s global batch (`mlx_sd.training.sample_keys`)."""
    return [seed, update, position, 7, 7, 7, 7]


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch: a permutation fixed by (seed, epoch), so resume is exact."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class BatchPlan:
    """Which samples make global micro-batch `c` of the run, from any position; a pure function of the seed.

    The run reads the epochs' orders (`epoch_order`) one after the other as one stream of samples:
    stream position s is sample `epoch_order(e)[s % n]` of epoch e = s // n, mirrored by its
    `flip_key(seed, e, s % n)`. Every image is trained once per epoch; a batch may hold the end of one
    epoch and the start of the next. `batch` is the global micro-batch (--train_batch_size x ranks)
    and `accum` micro-batches make one update: micro-batch c holds stream positions [c*batch, (c+1)*batch),
    i.e. positions [m*batch, (m+1)*batch) of update c // accum's global batch, m = c % accum. So the
    samples of an update depend only on the global batch (batch x accum), however it is split into
    ranks, per-device batches and accumulation steps.
    """

    def __init__(self, n: int, batch: int, seed: int, flip: bool, accum: int = 1):
        if n < 1:
            raise DataError("no images to train on")
        self.n, self.batch, self.seed, self.flip, self.accum = n, batch, seed, flip, accum
        self.epoch_samples = n  # stream positions per epoch
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = epoch_order(self.n, self.seed, epoch)
        return self._orders[epoch]

    def __call__(self, c: int) -> tuple[int, np.ndarray, np.ndarray]:
        """(epoch of its last sample, sample indices, mirror flags) of global micro-batch `c`."""
        s = c * self.batch + np.arange(self.batch)
        epochs, i = s // self.n, s % self.n
        idx = np.array([self._order(int(e))[j] for e, j in zip(epochs, i)], np.int64)
        return int(epochs[-1]), idx, mirror_flags(self.seed, epochs, i, self.flip)

    def epoch_of(self, c: int) -> int:
        return ((c + 1) * self.batch - 1) // self.epoch_samples

    def locate(self, c: int) -> tuple[int, int]:
        """(update, position of its first sample in the update's global batch) of global micro-batch `c`."""
        u, m = divmod(c, self.accum)
        return u, m * self.batch


def atomic_save_npz(path: Path, **arrays) -> None:
    with atomic_file(path) as tmp:
        np.savez(tmp, **arrays)


# ----------------------------------------------------------------------------- encoding and caches


@dataclass
class EncodedData:
    """What the train step consumes, for every sample: posterior mean/std and text embeddings.

    `mean`/`std` are [N, h, w, 4] (and `mean_flip`/`std_flip` for the mirrored images when
    flipping), `text` is [U, 77, D] for the U unique captions, `caption_index` maps sample -> row.

    With aspect-ratio buckets, sample i is `bucket[i]`'s size (`bucket_size` [K, 2], width and
    height in pixels) and the latent arrays are lists with one [n_k, h_k, w_k, 4] array per bucket
    (rows in sample order; stored as `mean.<k>` ... in the npz). `original_size` [N, 2] (w, h) and
    `crop_ltrb` [N, 4] (the crop box in the resized image's pixels) record each image's geometry.
    """

    mean: np.ndarray | list[np.ndarray]
    std: np.ndarray | list[np.ndarray]
    text: np.ndarray
    caption_index: np.ndarray
    mean_flip: np.ndarray | list[np.ndarray] | None = None
    std_flip: np.ndarray | list[np.ndarray] | None = None
    bucket: np.ndarray | None = None
    bucket_size: np.ndarray | None = None
    original_size: np.ndarray | None = None
    crop_ltrb: np.ndarray | None = None

    _LATENTS = ("mean", "std", "mean_flip", "std_flip")

    def __len__(self) -> int:
        return len(self.caption_index)

    def latents(self, idx: np.ndarray, flips: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) [b, h, w, 4] of samples `idx`, mirrored where `flips`; one bucket per call."""
        if self.bucket is None:
            arrays, rows = (self.mean, self.std, self.mean_flip, self.std_flip), idx
        else:
            k = self.bucket[idx]
            if (k != k[0]).any():
                raise ValueError(f"samples {idx.tolist()} are in different buckets {k.tolist()}")
            rows = self._rows[idx]
            arrays = tuple(a[k[0]] if a is not None else None for a in (self.mean, self.std, self.mean_flip,
                                                                          self.std_flip))
        mean, std = arrays[0][rows], arrays[1][rows]
        if flips.any():
            mirrored = flips[:, None, None, None]
            mean = np.where(mirrored, arrays[2][rows], mean)
            std = np.where(mirrored, arrays[3][rows], std)
        return mean, std

    @cached_property
    def _rows(self) -> np.ndarray:
        """Each sample's row in its bucket's arrays (its rank among the bucket's samples)."""
        rows = np.empty(len(self.bucket), np.int64)
        for k in range(len(self.bucket_size)):
            members = np.flatnonzero(self.bucket == k)
            rows[members] = np.arange(len(members))
        return rows

    def arrays(self) -> dict[str, np.ndarray]:
        """The npz keys: per-bucket latent lists become `name.<k>` keys."""
        out = {}
        for name in (f.name for f in fields(self)):
            v = getattr(self, name)
            if isinstance(v, list):
                out.update({f"{name}.{k}": a for k, a in enumerate(v)})
            elif v is not None:
                out[name] = v
        return out

    @classmethod
    def from_arrays(cls, z) -> "EncodedData":
        found = {k: z[k] for k in z.files if "." not in k}
        if "bucket_size" in found:
            for name in cls._LATENTS:
                parts = [z[f"{name}.{k}"] for k in range(len(found["bucket_size"])) if f"{name}.{k}" in z.files]
                if parts:
                    found[name] = parts
        return cls(**found)


# Images per VAE encode call: 4 at 256 px, 1 at 512 px. The encoder's full-resolution
# activations grow with batch x pixels: at 512 px a batch of 4 took the process to 7.3 GB RSS
# and 27 s per image on the CPU backend, a batch of 1 to 2.2 GB and 20 s.
ENCODE_PIXELS = 4 * 256 * 256


def encode_images(vae, paths: list[Path], resolution: int, flip: bool, batch_size: int | None = None,
                  progress: bool = True, size: tuple[int, int] | None = None):
    """VAE posterior (mean, std) of each image, NHWC float32 numpy; `flip` encodes the mirror.

    Images are cropped to `size` (w, h) or a square of `resolution`.
    """
    import mlx.core as mx
    from tqdm import tqdm

    w, h = size or (resolution, resolution)
    batch_size = batch_size or max(1, ENCODE_PIXELS // (w * h))
    what = "encoding images" + (f" {w}x{h}" if size else "") + (" (mirrored)" if flip else "")

    encode = mx.compile(lambda x: vae.encode(x))
    means, stds = [], []
    for i in tqdm(range(0, len(paths), batch_size), desc=what, disable=not progress, unit="batch"):
        x = np.stack([preprocess(p, resolution, flip=flip, size=size) for p in paths[i:i + batch_size]])
        mean, logvar = encode(mx.array(x))
        std = mx.exp(0.5 * logvar)
        mx.eval(mean, std)
        means.append(np.array(mean))
        stds.append(np.array(std))
    return np.concatenate(means), np.concatenate(stds)


def encode_captions(text_encoder, tokenizer, captions: list[str], batch_size: int = 16,
                    progress: bool = True):
    """Embeddings of the unique captions [U, 77, D] and the sample -> row index."""
    import mlx.core as mx
    from tqdm import tqdm

    unique = sorted(set(captions))
    row = {c: i for i, c in enumerate(unique)}
    out = []
    for i in tqdm(range(0, len(unique), batch_size), desc="encoding captions", disable=not progress, unit="batch"):
        e = text_encoder(mx.array(tokenizer(unique[i:i + batch_size])))
        mx.eval(e)
        out.append(np.array(e))
    return np.concatenate(out), np.array([row[c] for c in captions], dtype=np.int64)


def load_or_encode(cache_dir: Path | None, key: str, samples: list[Sample], resolution: int, flip: bool,
                   load_vae, load_text, tokenizer, progress: bool = True,
                   buckets: tuple[np.ndarray, np.ndarray] | None = None) -> EncodedData:
    """Encode the dataset once; with `cache_dir`, reuse `cache_dir/encoded-<key>.npz` when present.

    `buckets` = (bucket of each sample [N], bucket sizes [K, 2] as (w, h)) encodes each image at
    its bucket's size (center crop) instead of a square of `resolution`. `load_vae`/`load_text`
    are called only when encoding is needed, and their models are dropped before returning, so
    the training loop holds neither. `load_text=None` (the text encoder trains, so its embeddings
    change every step) caches the UNet side only: `text` is then empty.
    """
    path = cache_dir / f"encoded-{key}.npz" if cache_dir else None
    if path is not None and path.exists():
        try:
            with np.load(path) as z:
                data = EncodedData.from_arrays(z)
            same_buckets = (data.bucket is None) if buckets is None else (
                data.bucket is not None and np.array_equal(data.bucket, buckets[0])
                and np.array_equal(data.bucket_size, buckets[1]))
            if len(data) == len(samples) and (data.mean_flip is not None) == flip and same_buckets:
                logger.info("using cached latents and text embeddings: %s", path)
                if load_text is not None and not data.text.size:  # cached by a run that trained the text encoder
                    data.text, data.caption_index = encode_captions(load_text(), tokenizer,
                                                                    [s.caption for s in samples], progress=progress)
                    atomic_save_npz(path, **{k: v for k, v in data.__dict__.items() if v is not None})
                return data
        except Exception as e:  # a damaged cache is rebuilt, never trusted
            logger.warning("ignoring unreadable cache %s (%s)", path, e)
    vae = load_vae()
    paths = [s.path for s in samples]
    if buckets is None:
        latents = [encode_images(vae, paths, resolution, f, progress=progress) for f in (False, True)[:1 + flip]]
        geometry = {}
    else:
        bucket, sizes = buckets
        members = [np.flatnonzero(bucket == k) for k in range(len(sizes))]
        if not all(len(m) for m in members):
            raise ValueError("every bucket given must hold at least one sample")
        latents = []
        for f in (False, True)[:1 + flip]:
            pairs = [encode_images(vae, [paths[i] for i in m], resolution, f, progress=progress,
                                   size=(int(w), int(h))) for m, (w, h) in zip(members, sizes)]
            latents.append(([m for m, _ in pairs], [s for _, s in pairs]))
        original = np.array([oriented_size(p) for p in paths], np.int64)
        crops = [cover_crop(tuple(original[i]), tuple(sizes[bucket[i]]))[1] for i in range(len(paths))]
        geometry = dict(bucket=bucket.astype(np.int64), bucket_size=np.asarray(sizes, np.int64),
                        original_size=original, crop_ltrb=np.array(crops, np.int64))
    del vae
    if load_text is None:
        text, index = np.zeros((0,), np.float32), np.zeros(len(samples), np.int64)
    else:
        text, index = encode_captions(load_text(), tokenizer, [s.caption for s in samples], progress=progress)
    (mean, std), (mean_f, std_f) = latents[0], (latents[1] if flip else (None, None))
    data = EncodedData(mean, std, text, index, mean_f, std_f, **geometry)
    if path is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_save_npz(path, **data.arrays())
    return data
