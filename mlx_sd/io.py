"""Files on disk: atomic writes, the cache root, Hub repo ids, and how every image file is read.

Everything the product writes that a user keeps (checkpoints, adapters, converted models, images,
captions, caches) goes through `atomic_file` or `atomic_folder`: the final path holds either the old
complete content or the new complete content, never a partial write, and a failure (disk full,
Ctrl-C, a crash) removes the temporary file. No MLX import here: `mlx_sd.blas` uses this module
before MLX is loaded.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import struct
from contextlib import contextmanager
from pathlib import Path

from .errors import MlxSdError


def _owner() -> str:
    # Host and pid: ranks of a data-parallel run may share a folder over a network disk.
    return f"{socket.gethostname()}-{os.getpid()}"


def _tmp_name(path: Path) -> Path:
    # Keep the suffix: mx.save_safetensors and np.savez append theirs to any other name.
    return path.with_name(f".{path.stem}.tmp-{_owner()}{path.suffix}")


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk (best effort where the OS does not allow it)."""
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


@contextmanager
def atomic_file(path: str | Path, fsync: bool = False):
    """Yield a temporary path beside `path`; rename it over `path` when the block succeeds.

    The temporary name keeps `path`'s suffix and starts with a dot, so folder scans skip it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        if fsync:
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if _is_write_failure(e) and not isinstance(e, MlxSdError):
            raise write_failure(path, e) from e
        raise


def write_text(path: str | Path, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextmanager
def atomic_folder(path: str | Path, fsync: bool = False):
    """Yield an empty temporary folder beside `path`; it replaces `path` when the block succeeds.

    `path` is then absent, the previous complete folder, or the new complete one: the old folder is
    renamed aside before the new one is renamed in, and deleted only after that.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{_owner()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if fsync:
            for f in tmp.rglob("*"):
                if f.is_file():
                    fsync_path(f)
        if path.exists():
            discard(path, after=lambda: os.replace(tmp, path))
        else:
            os.replace(tmp, path)
        if fsync:
            fsync_path(path.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_write_failure(e) and not isinstance(e, MlxSdError):
            raise write_failure(path, e) from e
        raise


def discard(path: Path, after=None) -> None:
    """Rename `path` aside (atomic), run `after()`, then delete it: a kill mid-delete leaves no half folder."""
    trash = path.with_name(f".{path.name}.old-{_owner()}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    if after is not None:
        after()
    shutil.rmtree(trash, ignore_errors=True)


def cache_root() -> Path:
    """Where converted models and the patched BLAS are cached: $MLX_SD_CACHE, else $XDG_CACHE_HOME or ~/.cache."""
    root = os.environ.get("MLX_SD_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return (Path(root) if root else Path.home() / ".cache") / "mlx-sd-lora"


def is_repo_id(text: str) -> bool:
    """True if `text` has the shape of a Hugging Face repo id (owner/name) and is not a local path."""
    text = str(text)
    return (text.count("/") == 1 and not text.startswith((".", "/", "~")) and not text.endswith("/")
            and not Path(text).expanduser().exists())


def safetensors_problem(path: str | Path) -> str | None:
    """Why `path` is not a complete safetensors file (truncated, text, a pickle...); None if it looks whole.

    Reads the 8-byte header length and the JSON header only: cheap enough to check every file a run
    is about to trust, and it names the problem where a loader would fail with a bare error.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes: empty or truncated"
            n = struct.unpack("<Q", head)[0]
            if head[:1] == b"\x80" or head[:2] == b"PK":
                return "a PyTorch pickle/zip file, not safetensors"
            first = f.read(1)
            if n > 100_000_000 or first != b"{":
                return "not a safetensors file (no valid header: text, a pickle, or another format?)"
            if n > size - 8:
                return f"truncated: {size:,} bytes, less than its own header ({n + 8:,} bytes)"
            header = json.loads(first + f.read(n - 1))
    except OSError as e:
        return f"unreadable ({e.strerror})"
    except (ValueError, UnicodeDecodeError):
        return "not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return "not a safetensors file (its header is not a JSON object)"
    ends = [int(v["data_offsets"][1]) for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    need = 8 + n + max(ends, default=0)
    if need > size:
        return f"truncated: {size:,} bytes of {need:,}"
    return None


class WriteError(MlxSdError):
    pass


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM}


def _is_write_failure(e: BaseException) -> bool:
    # MLX reports a failed write as RuntimeError("[write] Unable to write N bytes").
    if isinstance(e, OSError):
        return e.errno in _WRITE_ERRNOS
    return isinstance(e, RuntimeError) and ("[write]" in str(e) or "unable to write" in str(e).lower())


def write_failure(path: Path, e: BaseException) -> WriteError:
    """One line for a failed write: the file, the cause (disk full named as such) and what to do."""
    try:
        free = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free
    except OSError:
        free = None
    full = getattr(e, "errno", None) == errno.ENOSPC or (free is not None and free < (1 << 20))
    cause = "the disk is full" + (f" ({free // 1024} KiB free)" if free is not None else "") if full else \
        (getattr(e, "strerror", None) or str(e))
    return WriteError(f"{path}: could not be written: {cause}. Nothing partial was left; "
                      f"{'free some space' if full else 'fix the cause'} and run the same command again.")


# ----------------------------------------------------------------------------- images

# Alpha modes: straight alpha (RGBA, LA, PA) and premultiplied (RGBa, La); PIL's convert("RGBA") handles each.
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageModeError(MlxSdError, ValueError):
    pass


def _eight_bit_gray(im):
    """A 16-bit (I;16*, or I holding 16-bit samples) or float (F) grayscale image -> 8-bit L or LA.

    PIL's own conversion clips these at 255 (16-bit images turn white, float images black); here
    0..65535 maps to 0..255 as v / 257 rounded (the exact 16 -> 8 bit scale), and float 0..1 to
    0..255. A tRNS grey level (16-bit PNGs) becomes an alpha channel, compared at full depth.
    """
    import numpy as np
    from PIL import Image

    v = np.asarray(im)
    if im.mode == "F":
        if not np.isfinite(v).all() or v.min() < -0.5 / 255 or v.max() > 1 + 0.5 / 255:
            raise ImageModeError(f"floating-point pixels in [{np.nanmin(v):g}, {np.nanmax(v):g}]; expected 0..1 "
                                 "(save the image as 8- or 16-bit, or scaled to 0..1)")
        gray = np.rint(np.clip(v, 0, 1) * 255).astype(np.uint8)
        return Image.fromarray(gray, "L")
    v = v.astype(np.int64)
    if v.size and (v.min() < 0 or v.max() > 65535):
        raise ImageModeError(f"32-bit integer pixels in [{v.min()}, {v.max()}]; expected 16-bit samples "
                             "(0..65535; save the image as 8- or 16-bit)")
    gray = ((v * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257), in integers
    t = im.info.get("transparency")
    if isinstance(t, int):
        return Image.fromarray(np.stack([gray, np.where(v == t, 0, 255).astype(np.uint8)], -1), "LA")
    return Image.fromarray(gray, "L")


def to_rgb(im):
    """Any PIL image -> 8-bit RGB, as training, validation and evaluation read every image file.

    - EXIF orientation is applied.
    - 16-bit and float grayscale are scaled to 8 bits (`_eight_bit_gray`), not clipped. 16-bit RGB
      and RGBA PNGs PIL itself reads as 8-bit, keeping each sample's high byte (v >> 8, within one
      level of the exact v / 257).
    - Every kind of transparency (an alpha channel, a palette's alpha, a tRNS colour or grey
      level) is composited on white, as product photos are shot on white.
    - Other modes (CMYK, YCbCr, 1-bit...) use PIL's conversion; ImageModeError where a mode has
      none or its values have no 8-bit reading.
    """
    from PIL import Image, ImageOps

    im = ImageOps.exif_transpose(im)
    if im.mode == "F" or im.mode == "I" or im.mode.startswith("I;16"):
        im = _eight_bit_gray(im)
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as e:
        raise ImageModeError(f"mode {im.mode} images cannot be read as RGB ({e}); save it as an 8-bit RGB PNG "
                             "or JPEG") from None


def read_rgb(path: str | Path):
    """An image file as 8-bit RGB (`to_rgb`), decoded in full."""
    from PIL import Image

    with Image.open(path) as im:
        return to_rgb(im)


def file_digest(path: str | Path, patterns: tuple[str, ...] = ("*.safetensors", "*.json")) -> str:
    """sha256 of a file's bytes; for a folder, of the names and bytes of its files matching `patterns`
    (recursively, sorted), so notes and images beside the weights do not change it."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted({f for p in patterns for f in path.rglob(p) if f.is_file()})
    for f in files:
        if f != path:
            h.update(f"{f.relative_to(path).as_posix()}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
