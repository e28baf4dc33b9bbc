"""Feature models for evaluation (`mlx-sd-eval`) -> MLX folders: one pure key mapping per format.

  inception  pytorch-fid's FID InceptionV3, `pt_inception-2015-12-05-6726825d.pth` (a torch pickle,
             read by `convert.pickle_reader` without running code), a local file or an https URL
  clip       transformers CLIPModel (`openai/clip-vit-large-patch14`), Hub id or local folder
  dinov2     transformers Dinov2Model (`facebook/dinov2-large`), Hub id or local folder

Output (OUT_DIR): config.json, model.safetensors (MLX layout: conv weights OIHW -> OHWI), for CLIP
its tokenizer and preprocessor files, and `mlx_sd.json` (written last) naming the feature model.
Written to a sibling temporary folder and renamed, as every conversion is.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import urllib.request
from pathlib import Path

import mlx.core as mx

from mlx_sd.io import atomic_folder
from mlx_sd.metrics.features import build_feature_model
from mlx_sd.model_folder import write_marker

from .folder import ConversionError, check_out_dir
from .pickle_reader import PICKLE_SUFFIXES, PickleReadError, read_state_dict

KINDS = ("inception", "clip", "dinov2")
PYTORCH_FID_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
CLIP_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                        "tokenizer.json", "preprocessor_config.json")
HUB_PATTERNS = ["config.json", *CLIP_TOKENIZER_FILES]


def _conv(value):
    return value.transpose(0, 2, 3, 1) if value.ndim == 4 else value


def inception_to_mlx(state: dict) -> dict:
    """pytorch-fid Inception keys -> MLX: same names; `fc.*` (class logits) and BN step counters dropped."""
    return {k: _conv(v) for k, v in state.items()
            if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}


def clip_to_mlx(state: dict) -> dict:
    """transformers CLIPModel keys -> MLX: same names; `logit_scale` and `position_ids` buffers dropped."""
    return {k: _conv(v) for k, v in state.items() if k != "logit_scale" and not k.endswith("position_ids")}


# transformers 5 names the attention projections q/k/v/o_proj in memory; the Hub files keep these.
_DINOV2_ATTENTION = {".attention.q_proj.": ".attention.attention.query.",
                     ".attention.k_proj.": ".attention.attention.key.",
                     ".attention.v_proj.": ".attention.attention.value.",
                     ".attention.o_proj.": ".attention.output.dense."}


def dinov2_to_mlx(state: dict) -> dict:
    """transformers Dinov2Model keys (file or in-memory names) -> MLX, which uses the Hub file's names.

    A `dinov2.` prefix (task models) is removed and their heads dropped.
    """
    out = {}
    for k, v in state.items():
        if k.startswith("dinov2."):
            k = k[len("dinov2."):]
        elif k.startswith("classifier."):
            continue
        for new, old in _DINOV2_ATTENTION.items():
            k = k.replace(new, old)
        out[k] = _conv(v)
    return out


MAPPINGS = {"inception": inception_to_mlx, "clip": clip_to_mlx, "dinov2": dinov2_to_mlx}


def _read_tensors(path: Path) -> dict[str, mx.array]:
    if path.suffix == ".safetensors":
        try:
            return mx.load(str(path))
        except Exception as e:
            raise ConversionError(f"{path}: not a readable safetensors file ({e})") from e
    if path.suffix.lower() in PICKLE_SUFFIXES:
        try:
            tensors, dtypes = read_state_dict(path)
        except PickleReadError as e:
            raise ConversionError(str(e)) from None
        return {k: mx.array(v).astype(mx.bfloat16) if dtypes[k] == "bfloat16" else mx.array(v)
                for k, v in tensors.items()}
    raise ConversionError(f"{path}: expected .safetensors or a torch file ({', '.join(PICKLE_SUFFIXES)})")


def _fetch_url(url: str, tmp: Path) -> Path:
    out = tmp / Path(url).name
    try:
        with urllib.request.urlopen(url) as r, open(out, "wb") as f:
            shutil.copyfileobj(r, f)
    except OSError as e:
        raise ConversionError(f"could not download {url}: {e}; download it yourself and pass the file") from e
    return out


def _resolve_folder(source: str, revision: str | None) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists() or source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise ConversionError(f"{source}: expected a transformers model folder or a Hugging Face repo id (owner/name)")
    from huggingface_hub import list_repo_files, snapshot_download

    try:
        files = list_repo_files(source, revision=revision)
        # one weights file: the safetensors one when the repo has it (CLIP's repo also has a 1.7 GB .bin)
        weights = "model.safetensors" if "model.safetensors" in files else "pytorch_model.bin"
        return Path(snapshot_download(source, revision=revision, allow_patterns=[*HUB_PATTERNS, weights]))
    except Exception as e:
        raise ConversionError(f"could not download Hub repo {source}: {e}") from e


def _folder_weights(folder: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).exists():
            return folder / name
    raise ConversionError(f"{folder}: no model.safetensors (or pytorch_model.bin)")


def check_feature_weights(kind: str, config: dict, weights: dict[str, mx.array], source: str) -> None:
    """Raise one ConversionError listing every missing, unexpected and mis-shaped key."""
    from mlx.utils import tree_flatten

    from mlx_sd.weights import mismatch_report

    model = build_feature_model(kind, config)
    msg = mismatch_report({k: tuple(v.shape) for k, v in tree_flatten(model.parameters())},
                          {k: tuple(v.shape) for k, v in weights.items()},
                          f"{source} does not match the {kind} feature model of its config:",
                          f"Is it the right file for --feature-model {kind}?")
    if msg:
        raise ConversionError(msg)


def convert_feature_model(kind: str, source: str | Path, out_dir: str | Path, *, force: bool = False,
                          revision: str | None = None) -> Path:
    """Convert one feature model (see the module docstring) into `out_dir`."""
    if kind not in KINDS:
        raise ConversionError(f"feature model {kind!r}: expected one of {', '.join(KINDS)}")
    out_dir = check_out_dir(out_dir, force)
    source = str(source)
    with tempfile.TemporaryDirectory() as dl:
        extra_files: list[Path] = []
        if kind == "inception":
            path = _fetch_url(source, Path(dl)) if source.startswith("https://") else Path(source).expanduser()
            if not path.is_file():
                raise ConversionError(f"{source}: no such file (pytorch-fid's weights: {PYTORCH_FID_URL})")
            config = {"model_type": "fid_inception_v3", "source_file": path.name}
        else:
            folder = _resolve_folder(source, revision)
            try:
                config = json.loads((folder / "config.json").read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ConversionError(f"{folder / 'config.json'}: cannot read the model config ({e})") from None
            path = _folder_weights(folder)
            if kind == "clip":
                extra_files = [folder / f for f in CLIP_TOKENIZER_FILES if (folder / f).exists()]
                if not any(f.name == "vocab.json" for f in extra_files) and not (folder / "tokenizer.json").exists():
                    raise ConversionError(f"{folder}: no CLIP tokenizer files (vocab.json, merges.txt)")
        weights = {k: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v
                   for k, v in MAPPINGS[kind](_read_tensors(path)).items()}
        try:
            check_feature_weights(kind, config, weights, str(path))
        except ValueError as e:  # config errors name the unsupported field
            raise ConversionError(f"{source}: {e}") from None

        with atomic_folder(out_dir) as tmp:
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
            for f in extra_files:
                shutil.copyfile(f, tmp / f.name)
            write_marker(tmp, source, "float32", feature_model=kind)
        return out_dir


def feature_model_kind(folder: str | Path) -> str | None:
    """The feature model a converted folder holds, or None for anything else."""
    marker = Path(folder) / "mlx_sd.json"
    try:
        return json.loads(marker.read_text()).get("feature_model")
    except (OSError, json.JSONDecodeError):
        return None



