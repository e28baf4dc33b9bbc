"""Open converted model folders (see `convert.folder` for the layout) with clear errors.

`resolve_model` accepts what users type: a converted folder, a diffusers folder or a Hub repo
id; the latter two are converted once into the cache and reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .config import SchedulerConfig, read_json

MARKER = "mlx_sd.json"


class ModelFolderError(FileNotFoundError):
    pass


def cache_root() -> Path:
    root = os.environ.get("MLX_SD_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return (Path(root) if root else Path.home() / ".cache") / "mlx-sd-lora"


class ModelFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise ModelFolderError(f"{self.path}: model folder not found")
        if not (self.path / MARKER).exists():
            if list((self.path / "unet").glob("diffusion_pytorch_model*")):
                raise ModelFolderError(
                    f"{self.path} is a diffusers folder, not a converted MLX model: "
                    f"run `python -m convert {self.path} OUT_DIR` (train.py does this for you)"
                )
            raise ModelFolderError(
                f"{self.path} is not a complete converted model (no {MARKER}); it may be half-written: "
                "re-run `python -m convert SOURCE OUT_DIR --force`"
            )
        self.info = json.loads((self.path / MARKER).read_text())

    def _component(self, name: str) -> Path:
        folder = self.path / name
        for f in ("config.json", "model.safetensors"):
            if not (folder / f).exists():
                raise ModelFolderError(f"{folder / f} missing; re-run `python -m convert SOURCE {self.path} --force`")
        return folder

    def text_encoder(self):
        from .clip import load_text_encoder

        return load_text_encoder(self._component("text_encoder"))

    def unet(self):
        from .unet import load_unet

        return load_unet(self._component("unet"))

    def vae(self):
        from .vae import load_vae

        return load_vae(self._component("vae"))

    def tokenizer(self):
        from .tokenizer import Tokenizer

        return Tokenizer(self.path / "tokenizer")

    def config(self, name: str) -> dict:
        return read_json(self._component(name) / "config.json")

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig.from_diffusers(read_json(self.path / "scheduler" / "scheduler_config.json"))


def resolve_model(name_or_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Return a converted folder for a converted folder, a diffusers folder or a Hub repo id."""
    from convert.folder import convert_pipeline, is_converted

    path = Path(name_or_path).expanduser()
    if path.is_dir() and is_converted(path):
        return path
    key = str(path.resolve()) if path.exists() else str(name_or_path)
    slug = "".join(c if c.isalnum() else "-" for c in key.strip("/"))[-60:]
    target = Path(cache_dir or cache_root() / "models") / f"{slug}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    if is_converted(target):
        return target
    return convert_pipeline(name_or_path, target, force=target.exists(), progress=True)
