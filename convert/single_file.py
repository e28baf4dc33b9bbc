"""Original single-file checkpoints (A1111/ComfyUI `.safetensors` / `.ckpt`) in and out.

In:  `python -m convert FILE OUT_DIR` or `python -m convert REPO_ID OUT_DIR --filename FILE`
     -> an MLX model folder (the layout of `convert.folder`). A single file carries weights
     only: configs, tokenizer and scheduler come from `--config DIR` (a diffusers or converted
     folder) or, by default, the bundled SD1.5 ones (`mlx_sd/configs/sd15`).
Out: `python -m convert --to-single-file MODEL_DIR OUT.safetensors` -> one original-layout file.

Steps: read (safetensors with `mx.load`; `.ckpt` only with `allow_pickle`, through
`convert.pickle_reader`, which runs no code from the file), name the architecture if it is not
SD1.x, check every key and shape against the target models in the file's own (LDM) names, then
`convert.ldm` (LDM <-> diffusers names) and `convert.layout` (diffusers <-> MLX layout). torch
is never imported.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from huggingface_hub import hf_hub_download
from mlx.utils import tree_flatten
from tqdm import tqdm

from mlx_sd.configs import SD15
from mlx_sd.weights import mismatch_report

from mlx_sd.io import atomic_file, atomic_folder, is_repo_id
from mlx_sd.model_folder import COMPONENTS, ModelFolder, build_component, copy_extras, write_marker

from .folder import DTYPES, ConversionError, check_out_dir, write_component
from .layout import mlx_to_diffusers
from .ldm import IGNORED, LDMKeyError, detect_architecture, diffusers_to_ldm, ldm_to_diffusers, select_unet_weights

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
UNET_WEIGHTS = {
    "ema": "EMA weights (the file also has non-EMA weights; --non-ema selects those)",
    "non-ema": "non-EMA weights (the file also has EMA weights)",
    "only": "the file's only UNet weights",
}


def _kind(name: str) -> str:
    suffix = Path(name).suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in PICKLE_SUFFIXES:
        return "pickle"
    raise ConversionError(f"{name}: unknown checkpoint type {suffix!r}; expected .safetensors or .ckpt")


def _refuse_pickle(name: str) -> None:
    raise ConversionError(
        f"{name} is a pickle checkpoint: loading one with torch.load can run code hidden in the file. Prefer a "
        ".safetensors version of it; or pass --allow-pickle: only its tensors are read, by an allow-list "
        "reader that never calls anything the file names (torch is not needed)."
    )


def resolve_single_file(source: str | Path, filename: str | None = None, revision: str | None = None,
                        allow_pickle: bool = False) -> Path:
    """A local checkpoint file as is, or `filename` downloaded from Hub repo `source`."""
    if filename is None:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ConversionError(f"{source}: no such file")
        if _kind(path.name) == "pickle" and not allow_pickle:
            _refuse_pickle(str(path))
        return path
    text = str(source)
    if not is_repo_id(text):
        raise ConversionError(f"{source}: --filename needs a Hugging Face repo id (owner/name) as SOURCE")
    if _kind(filename) == "pickle" and not allow_pickle:  # before a multi-GB download
        _refuse_pickle(f"{text}/{filename}")
    try:
        return Path(hf_hub_download(repo_id=text, filename=filename, revision=revision))
    except Exception as e:
        raise ConversionError(f"could not download {filename} from Hub repo {text}: {e}") from e


def _load_pickle(path: Path) -> dict[str, mx.array]:
    from .pickle_reader import PickleReadError, read_state_dict

    try:
        tensors, dtypes = read_state_dict(path)
    except PickleReadError as e:
        raise ConversionError(f"{e}. Convert it to .safetensors with a tool you trust.") from None
    out = {}
    for key in list(tensors):
        t = mx.array(tensors.pop(key))  # free each numpy copy once it is an MLX array
        out[key] = t.astype(mx.bfloat16) if dtypes[key] == "bfloat16" else t
    return out


def load_single_file(path: str | Path, allow_pickle: bool = False) -> dict[str, mx.array]:
    """The state dict of a checkpoint file; safetensors arrays load lazily (on first use)."""
    path = Path(path)
    if _kind(path.name) == "safetensors":
        try:
            return mx.load(str(path))
        except Exception as e:
            raise ConversionError(f"{path}: not a readable safetensors file ({e})") from e
    if not allow_pickle:
        _refuse_pickle(str(path))
    return _load_pickle(path)


def config_folder(config: str | Path | None) -> Path:
    """The folder whose unet/vae/text_encoder config.json, tokenizer/ and scheduler/ are used."""
    folder = SD15 if config is None else Path(config).expanduser()
    missing = [f"{c}/config.json" for c in COMPONENTS if not (folder / c / "config.json").exists()]
    missing += [f"{s}/" for s in ("tokenizer", "scheduler") if not (folder / s).is_dir()]
    if missing:
        raise ConversionError(f"--config {folder}: not a diffusers or converted model folder; "
                              f"missing {', '.join(missing)}")
    return folder


def _expected_ldm(configs: dict[str, dict]) -> dict[str, tuple[int, ...]]:
    """LDM names and shapes of the models `configs` describe (the models are built lazily)."""
    comps = {c: mlx_to_diffusers(c, dict(tree_flatten(build_component(c, configs[c]).parameters())), configs[c])
             for c in COMPONENTS}
    return {k: tuple(v.shape) for k, v in diffusers_to_ldm(comps).items() if not IGNORED.search(k)}


def check_ldm_keys(state_dict: dict, configs: dict[str, dict], source: str) -> None:
    """Raise one ConversionError listing every missing, unexpected and mis-shaped key (LDM names)."""
    # LDM stores some Linear layers as 1x1 convs; equal up to trailing 1s counts as equal.
    def squeeze(s):
        return tuple(s[:2]) if len(s) == 4 and tuple(s[2:]) == (1, 1) else tuple(s)

    msg = mismatch_report(_expected_ldm(configs),
                          {k: tuple(v.shape) for k, v in state_dict.items() if not IGNORED.search(k)},
                          f"{source} does not match the SD1.x models of its configs:",
                          "Is it a complete SD1.x checkpoint, and are the configs (--config) the ones "
                          "it was made with?",
                          same_shape=lambda a, b: squeeze(a) == squeeze(b))
    if msg:
        raise ConversionError(msg)


def convert_single_file(source: str | Path, out_dir: str | Path, *, filename: str | None = None,
                        config: str | Path | None = None, force: bool = False, dtype: str = "float32",
                        revision: str | None = None, allow_pickle: bool = False, prefer_ema: bool = True,
                        progress: bool = False) -> Path:
    """Convert an original-layout checkpoint file (local, or `filename` in Hub repo `source`)."""
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    out_dir = check_out_dir(out_dir, force)
    cfg = config_folder(config)
    path = resolve_single_file(source, filename, revision, allow_pickle)
    state = load_single_file(path, allow_pickle)
    if arch := detect_architecture(state):
        raise ConversionError(f"{path.name} is {arch}. "
                              "Only Stable Diffusion 1.x text-to-image checkpoints are supported.")
    try:
        state, unet_weights = select_unet_weights(state, prefer_ema)
    except LDMKeyError as e:
        raise ConversionError(f"{path.name}: {e}") from None
    configs = {c: json.loads((cfg / c / "config.json").read_text()) for c in COMPONENTS}
    check_ldm_keys(state, configs, str(path))
    components = ldm_to_diffusers(state)
    del state  # from here each component's arrays are dropped once written
    if progress:
        print(f"UNet: {UNET_WEIGHTS[unet_weights]}")

    with atomic_folder(out_dir) as tmp:
        for comp in tqdm(COMPONENTS, desc="converting", disable=not progress):
            write_component(comp, components.pop(comp), cfg / comp / "config.json", tmp, DTYPES[dtype],
                            source=f"{path} ({comp})")
        copy_extras(cfg, tmp)
        write_marker(tmp, str(source), dtype, single_file={
            "file": filename or path.name,
            "unet_weights": unet_weights,
            "configs": "bundled SD1.5" if config is None else str(cfg.resolve()),
        })
    return out_dir


def export_single_file(model_dir: str | Path, out_file: str | Path, *, dtype: str | None = None,
                       force: bool = False) -> Path:
    """A converted MLX model folder (LoRA-fused ones too) -> one original-layout .safetensors file.

    `dtype` None keeps the stored dtype. Written to a temporary file beside `out_file` and
    renamed, so `out_file` is never half-written.
    """
    folder = ModelFolder(model_dir)
    out_file = Path(out_file).expanduser().resolve()
    if out_file.suffix != ".safetensors":
        raise ConversionError(f"{out_file}: the single file must end in .safetensors")
    if out_file.exists() and not force:
        raise ConversionError(f"{out_file} already exists; pass --force to replace it")
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    unet_config = folder.config("unet")
    if unet_config.get("use_linear_projection") or unet_config.get("cross_attention_dim") in (1024, 2048):
        raise ConversionError(f"{folder.path} is not SD1.x-shaped (SD2/SDXL UNet config); "
                              "an SD1.x single file cannot hold it")
    components = {}
    for comp in COMPONENTS:
        tensors = mx.load(str(folder.weights_file(comp)))
        components[comp] = mlx_to_diffusers(comp, tensors, folder.config(comp))
    state = diffusers_to_ldm(components)
    del components
    if dtype is not None:
        state = {k: v if k.endswith("position_ids") else v.astype(DTYPES[dtype]) for k, v in state.items()}
    with atomic_file(out_file) as tmp:
        mx.save_safetensors(str(tmp), state, metadata={"format": "pt"})
    return out_file
