"""Any model source -> a converted MLX folder: the entry point train.py, generate and the CLI use.

`convert_pipeline` picks the converter by what the source is (a diffusers folder or Hub repo id:
`convert.folder`; a single-file checkpoint, local or `filename` in a Hub repo: `convert.single_file`).
`resolve_model` accepts what users type and converts once into the cache.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from mlx_sd.io import cache_root
from mlx_sd.model_folder import is_converted

from .folder import ConversionError, convert_diffusers_folder
from .single_file import convert_single_file


def convert_pipeline(source: str | Path, out_dir: str | Path, *, force: bool = False,
                     dtype: str = "float32", revision: str | None = None, progress: bool = False,
                     filename: str | None = None, config: str | Path | None = None,
                     allow_pickle: bool = False, prefer_ema: bool = True) -> Path:
    """Convert a diffusers folder, a Hub repo id or a single-file checkpoint into `out_dir`.

    `config`, `allow_pickle` and `prefer_ema` apply to single-file checkpoints. The result is
    assembled in a sibling temporary folder and renamed into place.
    """
    if filename is not None or Path(source).expanduser().is_file():
        return convert_single_file(source, out_dir, filename=filename, config=config, force=force, dtype=dtype,
                                   revision=revision, allow_pickle=allow_pickle, prefer_ema=prefer_ema,
                                   progress=progress)
    if config is not None:
        raise ConversionError("--config applies to single-file checkpoints; a diffusers folder brings its own configs")
    return convert_diffusers_folder(source, out_dir, force=force, dtype=dtype, revision=revision, progress=progress)


def resolve_model(name_or_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Return a converted folder for a converted folder, a diffusers folder or a Hub repo id."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() and is_converted(path):
        return path
    key = str(path.resolve()) if path.exists() else str(name_or_path)
    slug = "".join(c if c.isalnum() else "-" for c in key.strip("/"))[-60:]
    target = Path(cache_dir or cache_root() / "models") / f"{slug}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    if is_converted(target):
        return target
    return convert_pipeline(name_or_path, target, force=target.exists(), progress=True)
