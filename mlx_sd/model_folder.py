"""Converted MLX model folders (the layout `python -m convert` writes), opened with clear errors.

    unet/ vae/ text_encoder/    config.json + model.safetensors (MLX layout)
    tokenizer/ scheduler/       as in the diffusers folder
    model_index.json            copied from the source
    mlx_sd.json                 written last; a folder without it is not a finished conversion

Turning a diffusers folder or a Hub repo id into such a folder is `convert`'s job
(`convert.resolve_model`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .config import CLIPTextConfig, SchedulerConfig, UNetConfig, VAEConfig, read_json
from .errors import MlxSdError

MARKER = "mlx_sd.json"
FORMAT_VERSION = 1
COMPONENTS = ("unet", "vae", "text_encoder")


class ModelFolderError(MlxSdError, FileNotFoundError):
    pass


def is_converted(folder: str | Path) -> bool:
    return (Path(folder) / MARKER).exists()


def write_marker(folder: Path, source: str, dtype: str, **extra) -> None:
    """The last file of a conversion: what it was made from, in which dtype."""
    marker = {"format": "mlx-sd", "version": FORMAT_VERSION, "source": source, "dtype": dtype, **extra}
    (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def copy_extras(folder: Path, out: Path) -> None:
    """What a model folder carries besides the weights: tokenizer, scheduler, model_index.json."""
    for sub in ("tokenizer", "scheduler"):
        shutil.copytree(folder / sub, out / sub)
    if (folder / "model_index.json").exists():
        shutil.copyfile(folder / "model_index.json", out / "model_index.json")


def build_component(name: str, config: dict):
    """The MLX module of component `name` from its diffusers config; weights stay lazy (only shapes)."""
    if name == "text_encoder":
        from .clip import CLIPTextModel

        return CLIPTextModel(CLIPTextConfig.from_diffusers(config))
    if name == "unet":
        from .unet import UNet2DConditionModel

        return UNet2DConditionModel(UNetConfig.from_diffusers(config))
    if name == "vae":
        from .vae import AutoencoderKL

        return AutoencoderKL(VAEConfig.from_diffusers(config))
    raise ValueError(f"unknown component {name!r}; expected one of {COMPONENTS}")


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

    def component_dir(self, name: str) -> Path:
        """`path/name`, checked to hold its config.json and model.safetensors."""
        folder = self.path / name
        for f in ("config.json", "model.safetensors"):
            if not (folder / f).exists():
                raise ModelFolderError(f"{folder / f} missing; re-run `python -m convert SOURCE {self.path} --force`")
        return folder

    def weights_file(self, name: str) -> Path:
        return self.component_dir(name) / "model.safetensors"

    def text_encoder(self):
        from .clip import load_text_encoder

        return load_text_encoder(self.component_dir("text_encoder"))

    def unet(self):
        from .unet import load_unet

        return load_unet(self.component_dir("unet"))

    def vae(self):
        from .vae import load_vae

        return load_vae(self.component_dir("vae"))

    def tokenizer(self):
        from .tokenizer import Tokenizer

        return Tokenizer(self.path / "tokenizer")

    def config(self, name: str) -> dict:
        return read_json(self.component_dir(name) / "config.json")

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig.from_diffusers(read_json(self.path / "scheduler" / "scheduler_config.json"))
