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
import struct
import zipfile
import zlib
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import MlxSdError
from .logs import FILE_ONLY
from .io import ImageModeError, WriteError, atomic_file, to_rgb

logger = logging.getLogger(__name__)

CAPTION_FILES = ("captions.json", "metadata.jsonl")
SIDECAR_EXTENSIONS = (".txt", ".caption")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# What PIL raises for a file it cannot decode: OSError (truncated, not an image: UnidentifiedImageError),
# SyntaxError (malformed PNG/GIF chunks), ValueError, EOFError, struct.error and zlib.error (damaged
# headers and streams), DecompressionBombError (larger than PIL's pixel limit).
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)
_FILE_KEYS = ("file_name", "image", "file", "filename", "path")
_TEXT_KEYS = ("text", "caption", "prompt")


class DataError(MlxSdError, ValueError):
    pass


@dataclass(frozen=True)
class Sample:
    path: Path
    caption: str


def _record(rec, where: str, file_keys, text_keys, image_column, caption_column) -> tuple[str, str]:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: not an object with a file name and a caption")
    f = next((rec[k] for k in file_keys if k in rec), None)
    if f is None:
        raise DataError(f"{where}: no file name (one of {', '.join(file_keys)}; keys present: "
                        f"{', '.join(rec) or 'none'})" + ("; check --image_column" if image_column else ""))
    if caption_column and caption_column not in rec:
        raise DataError(f"{where}: no {caption_column!r} column (--caption_column); keys present: {', '.join(rec)}")
    t = next((rec[k] for k in text_keys if k in rec), "")
    return str(f), t if isinstance(t, str) else ""


def _records_from_json(obj, source: Path, image_column: str | None = None, caption_column: str | None = None,
                       line: int | None = None) -> list[tuple[str, str]]:
    """Records of captions.json (a mapping or a list), or of one metadata.jsonl `line` (its one object)."""
    if isinstance(obj, dict) and line is None:
        return [(str(k), v if isinstance(v, str) else "") for k, v in obj.items()]
    # An imagefolder's "image" column is its file_name key (as the datasets library reads it).
    file_keys = (image_column, "file_name") if image_column else _FILE_KEYS
    text_keys = (caption_column,) if caption_column else _TEXT_KEYS
    if line is not None:
        return [_record(obj, f"{source} line {line}", file_keys, text_keys, image_column, caption_column)]
    if not isinstance(obj, list):
        raise DataError(f"{source}: expected a mapping {{file: caption}} or a list of records")
    return [_record(rec, f"{source} entry {i}", file_keys, text_keys, image_column, caption_column)
            for i, rec in enumerate(obj)]


_BOMS = ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe\x00\x00", "utf-32-le"), (b"\x00\x00\xfe\xff", "utf-32-be"),
         (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))


def read_text(path: Path) -> str:
    """A text file's contents: UTF-8, or UTF-8/16/32 after its byte-order mark (which is dropped).

    DataError (naming the file) for anything else: another 8-bit encoding, UTF-16 without a BOM
    (it shows as NUL bytes) or binary data; guessing would train on garbled captions silently.
    """
    data = path.read_bytes()
    encoding, body = "utf-8", data
    for bom, enc in _BOMS:
        if data.startswith(bom):
            encoding, body = enc, data[len(bom):]
            break
    if encoding == "utf-8" and b"\0" in body:
        raise DataError(f"{path}: not text (NUL bytes: UTF-16 without a byte-order mark, or a binary file); "
                        "save it as UTF-8")
    try:
        return body.decode(encoding)
    except UnicodeDecodeError as e:
        hint = ": another encoding, such as Latin-1?" if encoding == "utf-8" else ""
        raise DataError(f"{path}: not {encoding.upper()} text (byte 0x{body[e.start]:02x} at offset "
                        f"{e.start + len(data) - len(body)}{hint}); save it as UTF-8") from None


@dataclass
class Captions:
    """What a dataset folder lists: (file, caption) records, relative to `images`, and what was not read.

    `problems`: one message per file left out (an unreadable caption file, an image that the
    captions file does not list, an image type that is not read); `notes`: which caption source
    was used when several are present.
    """

    images: Path
    records: list[tuple[str, str | None]]
    problems: list[str]
    notes: list[str]


def _first_line(text: str) -> str:
    return next((line for line in (raw.strip() for raw in text.splitlines()) if line), "")


def _sidecar_records(images: Path, extension: str) -> Captions:
    """(image, caption) for every image in the folder with its caption file beside it, kohya's layout
    (`a.png` + `a.txt`); the caption is the file's first non-empty line, None when the file is missing.
    Caption files that cannot be read, and files of other image types beside a caption, are problems."""
    records, problems = [], []
    files = sorted(p for p in images.iterdir() if p.is_file())
    stems = {p.stem for p in files if p.suffix.lower() in IMAGE_EXTENSIONS}
    for path in files:
        suffix = path.suffix.lower()
        if suffix not in IMAGE_EXTENSIONS:
            if suffix not in (extension.lower(), *SIDECAR_EXTENSIONS) and path.stem not in stems \
                    and path.with_suffix(extension).is_file() and not path.name.startswith("."):
                kind = f"{suffix} files are" if suffix else "files without an extension are"
                problems.append(f"{path.name}: {kind} not read as images ({', '.join(IMAGE_EXTENSIONS)}); "
                                "convert it to PNG to train on it")
            continue
        cap = path.with_suffix(extension)
        text = None
        if cap.is_file():
            try:
                text = _first_line(read_text(cap))
            except (DataError, OSError) as e:
                problems.append(f"{path.name}: caption file unreadable: {e}")
                continue
        records.append((path.name, text))
    return Captions(images, records, problems, [])


def _unlisted(images: Path, records: list[tuple[str, str | None]], source: Path) -> list[str]:
    """Images in the images folder that the captions file does not name: never trained on, so named."""
    listed = {os.path.normcase(os.path.normpath(n)) for n, _ in records}
    return [f"{p.name}: not listed in {source} (add it there to train on it)"
            for p in sorted(images.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
            and not p.name.startswith(".") and os.path.normcase(p.name) not in listed]


def _other_sources(folder: Path, used: Path) -> list[str]:
    sidecars = {ext: sum(1 for _ in folder.glob(f"*{ext}")) for ext in SIDECAR_EXTENSIONS}
    found = [f"{n} {ext} caption file(s)" for ext, n in sidecars.items() if n]
    found += [name for name in CAPTION_FILES if (folder / name).is_file() and folder / name != used]
    return [f"captions are read from {used}; {' and '.join(found)} in {folder} are not read"] if found else []


def read_dataset(data_dir: str | Path, caption_extension: str | None = None, image_column: str | None = None,
                 caption_column: str | None = None) -> Captions:
    """The records of a dataset folder, and what in it is not read.

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
            found = _sidecar_records(folder, ext)
            if any(text is not None for _, text in found.records):
                return found
        raise DataError(f"{data_dir}: no image with a {ext} caption file beside it (--caption_extension {ext})")
    for folder in folders:
        cj, mj = folder / "captions.json", folder / "metadata.jsonl"
        if cj.exists():
            try:
                obj = json.loads(read_text(cj))
            except json.JSONDecodeError as e:
                raise DataError(f"{cj}: invalid JSON ({e})") from None
            where = images if folder == data_dir else folder
            records = _records_from_json(obj, cj, image_column, caption_column)
            return Captions(where, records, _unlisted(where, records, cj), _other_sources(where, cj))
        if mj.exists():
            records = []
            for n, line in enumerate(read_text(mj).splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{mj} line {n}: invalid JSON ({e})") from None
                records += _records_from_json(obj, mj, image_column, caption_column, line=n)
            return Captions(folder, records, _unlisted(folder, records, mj), _other_sources(folder, mj))
    for folder in folders:
        for ext in SIDECAR_EXTENSIONS:
            found = _sidecar_records(folder, ext)
            if any(text is not None for _, text in found.records) or found.problems:
                return found
    raise DataError(f"{data_dir}: no captions: expected captions.json or metadata.jsonl (in the folder, images/ or "
                    "train/), or a caption file beside each image (a.png + a.txt; --caption_extension for others)")


def read_captions(data_dir: str | Path, caption_extension: str | None = None, image_column: str | None = None,
                  caption_column: str | None = None) -> tuple[Path, list[tuple[str, str | None]]]:
    """(images folder, [(file name, caption)]) of a dataset folder (`read_dataset`'s records)."""
    found = read_dataset(data_dir, caption_extension, image_column, caption_column)
    return found.images, found.records


def scan(data_dir: str | Path, strict: bool = False, caption_extension: str | None = None,
         image_column: str | None = None, caption_column: str | None = None) -> tuple[list[Sample], list[str]]:
    """Check every entry up front: file exists, decodes fully, caption not empty.

    Returns (usable samples, one message per skipped entry). With `strict`, any problem raises.
    The other arguments are `read_captions`'.
    """
    found = read_dataset(data_dir, caption_extension, image_column, caption_column)
    images, records = found.images, found.records
    for note in found.notes:
        logger.warning("%s", note)
    good, problems = [], list(found.problems)
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
                to_rgb(im)  # full decode and conversion: catches truncated/corrupt files that open() accepts
        except ImageModeError as e:
            problems.append(f"{name}: {e}")
            continue
        except IMAGE_ERRORS as e:
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


# What np.load and EncodedData.from_arrays raise for a damaged or foreign npz: a truncated or non-zip
# file (BadZipFile, EOFError, OSError, ValueError), a missing array (KeyError), unknown or missing
# fields (TypeError).
CACHE_ERRORS = (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile)


def _read_cache(path: Path, n: int, flip: bool, buckets) -> EncodedData | None:
    """The cached EncodedData at `path` if it is readable and matches; None to encode again."""
    try:
        with np.load(path) as z:
            data = EncodedData.from_arrays(z)
    except CACHE_ERRORS as e:  # a damaged cache is rebuilt, never trusted
        logger.warning("ignoring unreadable cache %s (%s: %s); encoding again", path, type(e).__name__, e)
        return None
    same_buckets = (data.bucket is None) if buckets is None else (
        data.bucket is not None and np.array_equal(data.bucket, buckets[0])
        and np.array_equal(data.bucket_size, buckets[1]))
    if len(data) == n and (data.mean_flip is not None) == flip and same_buckets:
        return data
    logger.warning("cache %s does not match this dataset (%d samples, flip %s, buckets); encoding again",
                   path, len(data), data.mean_flip is not None)
    return None


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
    data = _read_cache(path, len(samples), flip, buckets) if path is not None and path.exists() else None
    if data is not None:
        logger.info("using cached latents and text embeddings: %s", path)
        if load_text is not None and not data.text.size:  # cached by a run that trained the text encoder
            data.text, data.caption_index = encode_captions(load_text(), tokenizer, [s.caption for s in samples],
                                                            progress=progress)
            try:
                atomic_save_npz(path, **data.arrays())
            except WriteError as e:  # the embeddings are in memory: the run goes on, the next one encodes again
                logger.warning("could not add the text embeddings to the cache: %s", e)
        return data
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
