"""Diffusers folders and Hub repos -> MLX model folders, written atomically.

Output layout (OUT_DIR):
    unet/ vae/ text_encoder/    config.json + model.safetensors (MLX layout, see convert.diffusers)
    tokenizer/ scheduler/       copied as they are
    model_index.json            copied from the source
    mlx_sd.json                 written last; a folder without it is not a finished conversion
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
from huggingface_hub import list_repo_files, snapshot_download
from tqdm import tqdm

from .diffusers import COMPONENTS, diffusers_to_mlx

MARKER = "mlx_sd.json"
FORMAT_VERSION = 1
WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


class ConversionError(RuntimeError):
    pass


def hub_patterns() -> list[str]:
    """Only what a conversion needs: fp32 safetensors, configs, tokenizer, scheduler."""
    pats = ["model_index.json", "tokenizer/*", "scheduler/*"]
    for comp, stem in WEIGHT_FILES.items():
        pats += [f"{comp}/config.json", f"{comp}/{stem}.safetensors",
                 f"{comp}/{stem}.safetensors.index.json", f"{comp}/{stem}-*-of-*.safetensors"]
    return pats


def _check_hub_files(repo_id: str, files: list[str]) -> None:
    problems = []
    for comp, stem in WEIGHT_FILES.items():
        has_st = f"{comp}/{stem}.safetensors" in files or f"{comp}/{stem}.safetensors.index.json" in files
        if has_st:
            continue
        if any(f.startswith(f"{comp}/") and f.endswith(".bin") for f in files):
            problems.append(f"{comp}: only PyTorch .bin weights (pickle); a float32 .safetensors file is required")
        elif any(f.startswith(f"{comp}/") for f in files):
            problems.append(f"{comp}: no float32 safetensors weights ({comp}/{stem}.safetensors)")
        else:
            problems.append(f"{comp}: component folder missing")
    if problems:
        raise ConversionError(
            f"Hub repo {repo_id} cannot be converted:\n  " + "\n  ".join(problems)
            + "\nConvert a repo that ships diffusers safetensors (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5)."
        )


def resolve_source(source: str | Path, revision: str | None = None) -> Path:
    """A local diffusers folder as is; otherwise a Hub repo id, downloading only what is needed."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConversionError(f"{path}: expected a diffusers folder or a .safetensors/.ckpt single file")
        return path
    text = str(source)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise ConversionError(f"{source}: no such folder, and not a Hugging Face repo id (owner/name)")
    try:
        files = list_repo_files(text, revision=revision)
    except Exception as e:
        raise ConversionError(f"could not list Hub repo {text}: {e}") from e
    _check_hub_files(text, files)
    return Path(snapshot_download(text, revision=revision, allow_patterns=hub_patterns()))


def _weights_path(folder: Path, comp: str) -> list[Path]:
    stem = WEIGHT_FILES[comp]
    single = folder / comp / f"{stem}.safetensors"
    if single.exists():
        return [single]
    index = folder / comp / f"{stem}.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / comp / s for s in shards]
    return []


def inspect_diffusers_folder(folder: Path) -> None:
    """Raise one ConversionError naming everything that makes `folder` unconvertible."""
    index = folder / "model_index.json"
    if index.exists():
        cls = json.loads(index.read_text()).get("_class_name", "")
        if "XL" in cls or cls not in ("", "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"):
            raise ConversionError(f"{folder}: pipeline class {cls!r} is not a Stable Diffusion 1.x/2.x text-to-image pipeline")
    problems = []
    for comp in COMPONENTS:
        if not (folder / comp).is_dir():
            problems.append(f"{comp}/ missing")
            continue
        if not (folder / comp / "config.json").exists():
            problems.append(f"{comp}/config.json missing")
        if not _weights_path(folder, comp):
            bins = list((folder / comp).glob("*.bin"))
            problems.append(
                f"{comp}/: only .bin (pickle) weights {[b.name for b in bins]}; save it with safe_serialization=True"
                if bins else f"{comp}/{WEIGHT_FILES[comp]}.safetensors missing"
            )
    for sub, need in (("tokenizer", "vocab.json"), ("scheduler", "scheduler_config.json")):
        if not (folder / sub / need).exists() and not (sub == "tokenizer" and (folder / sub / "tokenizer.json").exists()):
            problems.append(f"{sub}/{need} missing")
    if problems:
        raise ConversionError(
            f"{folder} is not a complete Stable Diffusion diffusers folder:\n  " + "\n  ".join(problems)
        )


def _build_model(comp: str, config: dict):
    """The MLX module for a component; construction is lazy, so only shapes are materialised."""
    from mlx_sd.clip import CLIPTextModel
    from mlx_sd.config import CLIPTextConfig, UNetConfig, VAEConfig

    if comp == "text_encoder":
        return CLIPTextModel(CLIPTextConfig.from_diffusers(config))
    if comp == "unet":
        from mlx_sd.unet import UNet2DConditionModel

        return UNet2DConditionModel(UNetConfig.from_diffusers(config))
    from mlx_sd.vae import AutoencoderKL

    return AutoencoderKL(VAEConfig.from_diffusers(config))


def write_component(comp: str, tensors: dict[str, mx.array], config_file: Path, out: Path,
                    dtype=mx.float32, source: str = "") -> None:
    """Diffusers-named tensors of one component -> `out/comp/` (MLX layout), strictly checked."""
    from mlx_sd.weights import check_weights

    config = json.loads(Path(config_file).read_text())
    weights = {k: v.astype(dtype) for k, v in diffusers_to_mlx(comp, tensors).items()}
    check_weights(_build_model(comp, config), weights, source=source or comp)
    (out / comp).mkdir(parents=True)
    mx.save_safetensors(str(out / comp / "model.safetensors"), weights, metadata={"format": "mlx"})
    shutil.copyfile(config_file, out / comp / "config.json")


def convert_component(folder: Path, comp: str, out: Path, dtype=mx.float32) -> None:
    tensors = {}
    for f in _weights_path(folder, comp):
        tensors.update(mx.load(str(f)))
    write_component(comp, tensors, folder / comp / "config.json", out, dtype, source=str(folder / comp))


def is_converted(folder: Path) -> bool:
    return (Path(folder) / MARKER).exists()


def check_out_dir(out_dir: str | Path, force: bool) -> Path:
    """The resolved output folder, if it may be written: absent, or a conversion to replace."""
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists():
        if not force:
            raise ConversionError(f"{out_dir} already exists; pass --force to replace it")
        if not is_converted(out_dir) and any(out_dir.iterdir()):
            raise ConversionError(f"{out_dir} exists and is not a converted model folder; refusing to replace it")
    return out_dir


def write_marker(folder: Path, source: str, dtype: str, **extra) -> None:
    marker = {"format": "mlx-sd", "version": FORMAT_VERSION, "source": source, "dtype": dtype, **extra}
    (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def write_folder_atomically(out_dir: Path, fill) -> Path:
    """Run `fill(tmp)` on a sibling temporary folder, then rename it to `out_dir`.

    `out_dir` is either absent, the previous complete folder, or the new complete one; a
    failure (or Ctrl-C) inside `fill` leaves no trace.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        fill(tmp)
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def convert_pipeline(source: str | Path, out_dir: str | Path, *, force: bool = False,
                     dtype: str = "float32", revision: str | None = None, progress: bool = False,
                     filename: str | None = None, config: str | Path | None = None,
                     allow_pickle: bool = False, prefer_ema: bool = True) -> Path:
    """Convert a diffusers folder, a Hub repo id or a single-file checkpoint into `out_dir`.

    A local `.safetensors`/`.ckpt` file, or a repo id with `filename`, goes to
    `convert.single_file.convert_single_file` (which uses `config`, `allow_pickle`,
    `prefer_ema`). The result is assembled in a sibling temporary folder and renamed into place.
    """
    if filename is not None or Path(source).expanduser().is_file():
        from .single_file import convert_single_file

        return convert_single_file(source, out_dir, filename=filename, config=config, force=force, dtype=dtype,
                                   revision=revision, allow_pickle=allow_pickle, prefer_ema=prefer_ema,
                                   progress=progress)
    if config is not None:
        raise ConversionError("--config applies to single-file checkpoints; a diffusers folder brings its own configs")
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    out_dir = check_out_dir(out_dir, force)
    folder = resolve_source(source, revision)
    inspect_diffusers_folder(folder)

    def fill(tmp: Path) -> None:
        for comp in tqdm(COMPONENTS, desc="converting", disable=not progress):
            convert_component(folder, comp, tmp, DTYPES[dtype])
        for sub in ("tokenizer", "scheduler"):
            shutil.copytree(folder / sub, tmp / sub)
        if (folder / "model_index.json").exists():
            shutil.copyfile(folder / "model_index.json", tmp / "model_index.json")
        write_marker(tmp, str(source), dtype)

    return write_folder_atomically(out_dir, fill)
