"""Image folders and the preprocessing each feature model expects.

Every array here is HWC/NHWC. Pixel values: uint8 as read, float32 in [0, 1] after `to_float`,
normalised float32 after `clip_pixels` / `dinov2_pixels`.

- pytorch-fid reads each image with PIL (`convert("RGB")`; `read_rgb` gives the same pixels for 8-bit RGB
  files and reads other modes as training does) and scales it to [0, 1]; the resize to
  299 happens inside the network (`FIDInceptionV3.features`), so `resize_matrix` reproduces torch's
  `interpolate(mode="bilinear"/"bicubic", align_corners=False, antialias=False)` exactly.
- CLIP: transformers' CLIPImageProcessor (PIL backend): shortest edge to 224 with PIL bicubic, centre
  crop 224, [0, 1], OpenAI mean/std.
- DINOv2 for FD-DINOv2 (Stein et al. 2023, dgm-eval): 224x224 PIL bicubic, ImageNet mean/std.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import MlxSdError
from ..io import read_rgb as io_read_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageFolderError(MlxSdError, ValueError):
    pass


def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def resize_matrix(n_in: int, n_out: int, mode: str) -> np.ndarray:
    """[n_out, n_in] float32 matrix R with `R @ x` == torch's 1-D interpolate of x (align_corners=False).

    Source coordinate (o + 0.5) * n_in / n_out - 0.5, computed in float32 as torch does (the
    rounding moves far pixels by ~1e-5); bilinear clamps it at 0 and takes 2 taps, bicubic
    (A = -0.75) takes 4 taps with indices clamped to the edge. No antialiasing.
    """
    scale = np.float32(n_in) / np.float32(n_out)
    src = ((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)).astype(np.float64)
    r = np.zeros((n_out, n_in), np.float64)
    rows = np.arange(n_out)
    if mode == "bilinear":
        src = np.maximum(src, 0.0)
        i0 = np.floor(src).astype(int)
        lam = src - i0
        i1 = np.minimum(i0 + 1, n_in - 1)
        np.add.at(r, (rows, i0), 1 - lam)
        np.add.at(r, (rows, i1), lam)
    elif mode == "bicubic":
        i0 = np.floor(src).astype(int)
        t = src - i0
        for k in (-1, 0, 1, 2):
            np.add.at(r, (rows, np.clip(i0 + k, 0, n_in - 1)), _cubic(t - k))
    else:
        raise ValueError(f"resize mode {mode!r}: expected 'bilinear' or 'bicubic'")
    return r.astype(np.float32)


@dataclass
class ImageList:
    """The readable images of a folder (sorted by name) and the files that were skipped, with why."""

    folder: Path
    paths: list[Path]
    skipped: list[tuple[Path, str]]


def list_images(folder: str | Path, check: bool = True) -> ImageList:
    """Image files directly in `folder` or its `images/` subfolder; unreadable ones are named and skipped."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ImageFolderError(f"{folder}: no such folder")
    root = folder / "images" if (folder / "images").is_dir() else folder
    paths = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    good, skipped = [], []
    for p in paths:
        if not check:
            good.append(p)
            continue
        try:
            with Image.open(p) as im:
                im.verify()
            good.append(p)
        except (OSError, UnidentifiedImageError, SyntaxError) as e:
            skipped.append((p, f"{type(e).__name__}: {e}"))
    if not good:
        raise ImageFolderError(f"{root}: no readable images ({', '.join(IMAGE_SUFFIXES)})"
                               + (f"; {len(skipped)} unreadable" if skipped else ""))
    return ImageList(root, good, skipped)


def read_rgb(path: Path) -> np.ndarray:
    """HWC uint8 RGB as training reads the file (`mlx_sd.io.to_rgb`).

    For an 8-bit RGB file without EXIF rotation this is pytorch-fid's `Image.open(path).convert("RGB")`;
    other modes are scaled or composited on white where a plain convert would clip or drop alpha, so
    real and generated images are compared as the model was trained on them.
    """
    return np.asarray(io_read_rgb(path))


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 HWC/NHWC -> float32 in [0, 1] (torchvision's ToTensor scaling)."""
    return images.astype(np.float32) / 255.0


def _normalise(pixels: np.ndarray, mean, std) -> np.ndarray:
    return ((pixels.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32))


def clip_pixels(image: Image.Image | np.ndarray, size: int = 224) -> np.ndarray:
    """One image -> [size, size, 3] float32, as CLIPImageProcessor (PIL backend) prepares it."""
    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    im = im.convert("RGB")
    w, h = im.size
    if (w, h) != (size, size):
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        new = (size, new_long) if w <= h else (new_long, size)
        im = im.resize(new, Image.Resampling.BICUBIC)
    w, h = im.size
    top, left = int((h - size) / 2.0), int((w - size) / 2.0)
    im = im.crop((left, top, left + size, top + size))
    return _normalise(np.asarray(im), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


def dinov2_pixels(image: Image.Image | np.ndarray, size: int = 224) -> np.ndarray:
    """One image -> [size, size, 3] float32: PIL bicubic resize to size x size, ImageNet normalisation."""
    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    im = im.convert("RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BICUBIC)
    return _normalise(np.asarray(im), IMAGENET_MEAN, IMAGENET_STD)
