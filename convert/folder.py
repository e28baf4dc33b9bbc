"""Diffusers folders and Hub repos -> MLX model folders, written atomically.

The output is the layout of `mlx_sd.model_folder`; weights are mapped by `convert.layout`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
from huggingface_hub import list_repo_files, snapshot_download
from tqdm import tqdm

from mlx_sd.errors import MlxSdError
from mlx_sd.io import atomic_folder, is_repo_id, safetensors_problem
from mlx_sd.model_folder import COMPONENTS, build_component, copy_extras, is_converted, write_marker
from mlx_sd.weights import check_weights

from .layout import diffusers_to_mlx

WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


class ConversionError(MlxSdError, RuntimeError):
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
    if not is_repo_id(text):
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
            raise ConversionError(f"{folder}: pipeline class {cls!r} is not a Stable Diffusion 1.x/2.x "
                                  "text-to-image pipeline")
    problems = []
    for comp in COMPONENTS:
        if not (folder / comp).is_dir():
            problems.append(f"{comp}/ missing")
            continue
        if not (folder / comp / "config.json").exists():
            problems.append(f"{comp}/config.json missing")
        for f in _weights_path(folder, comp):
            if problem := safetensors_problem(f):
                problems.append(f"{f.relative_to(folder)}: {problem}; download or save it again")
        if not _weights_path(folder, comp):
            bins = list((folder / comp).glob("*.bin"))
            problems.append(
                f"{comp}/: only .bin (pickle) weights {[b.name for b in bins]}; save it with safe_serialization=True"
                if bins else f"{comp}/{WEIGHT_FILES[comp]}.safetensors missing"
            )
    for sub, need in (("tokenizer", "vocab.json"), ("scheduler", "scheduler_config.json")):
        fast_tokenizer = sub == "tokenizer" and (folder / sub / "tokenizer.json").exists()
        if not (folder / sub / need).exists() and not fast_tokenizer:
            problems.append(f"{sub}/{need} missing")
    if problems:
        raise ConversionError(
            f"{folder} is not a complete Stable Diffusion diffusers folder:\n  " + "\n  ".join(problems)
        )


def write_component(comp: str, tensors: dict[str, mx.array], config_file: Path, out: Path,
                    dtype=mx.float32, source: str = "") -> None:
    """Diffusers-named tensors of one component -> `out/comp/` (MLX layout), strictly checked."""
    config = json.loads(Path(config_file).read_text())
    weights = {k: v.astype(dtype) for k, v in diffusers_to_mlx(comp, tensors).items()}
    check_weights(build_component(comp, config), weights, source=source or comp)
    (out / comp).mkdir(parents=True)
    mx.save_safetensors(str(out / comp / "model.safetensors"), weights, metadata={"format": "mlx"})
    shutil.copyfile(config_file, out / comp / "config.json")


def convert_component(folder: Path, comp: str, out: Path, dtype=mx.float32) -> None:
    tensors = {}
    for f in _weights_path(folder, comp):
        tensors.update(mx.load(str(f)))
    write_component(comp, tensors, folder / comp / "config.json", out, dtype, source=str(folder / comp))


def check_out_dir(out_dir: str | Path, force: bool) -> Path:
    """The resolved output folder, if it may be written: absent, or a conversion to replace."""
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ConversionError(f"{out_dir} is a file; the output must be a folder path")
        if not force:
            raise ConversionError(f"{out_dir} already exists; pass --force to replace it")
        if not is_converted(out_dir) and any(out_dir.iterdir()):
            raise ConversionError(f"{out_dir} exists and is not a converted model folder; refusing to replace it")
    return out_dir


def convert_diffusers_folder(source: str | Path, out_dir: str | Path, *, force: bool = False,
                             dtype: str = "float32", revision: str | None = None, progress: bool = False) -> Path:
    """Convert a diffusers folder or Hub repo id into `out_dir`, assembled aside and renamed into place."""
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    out_dir = check_out_dir(out_dir, force)
    folder = resolve_source(source, revision)
    inspect_diffusers_folder(folder)

    with atomic_folder(out_dir) as tmp:
        for comp in tqdm(COMPONENTS, desc="converting", disable=not progress):
            convert_component(folder, comp, tmp, DTYPES[dtype])
        copy_extras(folder, tmp)
        write_marker(tmp, str(source), dtype)
    return out_dir
