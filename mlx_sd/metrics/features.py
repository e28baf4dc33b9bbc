"""Feature extraction over image folders, with features cached by content.

`FeatureModel.load(folder)` opens a converted feature model (`python -m convert --feature-model`).
`folder_features` returns [N, D] float32 features of a folder's readable images (sorted by name),
in batches with a progress bar; images that fail to decode are named and skipped.

Cache (like clean-fid's custom statistics): the features of a set are stored under
`<cache>/eval-features/<kind>-<key>.npz`, the key being a SHA-256 over the feature model's
weights file, the preprocessing version and every image's bytes (names do not matter, content
does). Scoring new sets against the same 2,000 photos then reads the photos' features back.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from ..errors import MlxSdError
from ..io import atomic_file, cache_root
from .images import ImageList, clip_pixels, dinov2_pixels, read_rgb, to_float

logger = logging.getLogger(__name__)
PREPROCESS_VERSION = 2  # 2: 16-bit, float and tRNS images read as training reads them (io.to_rgb)
_FILE_HASHES: dict[tuple, str] = {}


class FeatureModelError(MlxSdError, ValueError):
    pass


def _sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _FILE_HASHES[key] = h.hexdigest()
    return _FILE_HASHES[key]


def build_feature_model(kind: str, config: dict):
    """An MLX feature model of `kind` ("inception", "clip", "dinov2") from its config.json contents."""
    from .clip_model import CLIPModel, CLIPModelConfig
    from .dinov2 import Dinov2Config, Dinov2Model
    from .inception import FIDInceptionV3

    if kind == "inception":
        return FIDInceptionV3()
    if kind == "clip":
        return CLIPModel(CLIPModelConfig.from_transformers(config))
    if kind == "dinov2":
        return Dinov2Model(Dinov2Config.from_transformers(config))
    raise FeatureModelError(f"unknown feature model {kind!r}; expected inception, clip or dinov2")


@dataclass
class FeatureModel:
    kind: str  # "inception" | "clip" | "dinov2"
    folder: Path
    model: object
    tokenizer: object = None

    @classmethod
    def load(cls, folder: str | Path) -> FeatureModel:
        folder = Path(folder).expanduser()
        try:
            kind = json.loads((folder / "mlx_sd.json").read_text()).get("feature_model")
        except (OSError, json.JSONDecodeError):
            kind = None
        if kind is None:
            raise FeatureModelError(f"{folder}: not a converted feature model; run "
                                    "`python -m convert --feature-model {inception,clip,dinov2} SOURCE "
                                    f"{folder}` first")
        if kind == "inception":
            from .inception import load_inception

            return cls(kind, folder, load_inception(folder))
        if kind == "clip":
            from ..tokenizer import Tokenizer
            from .clip_model import load_clip

            model = load_clip(folder)
            return cls(kind, folder, model, Tokenizer(folder, max_length=model.config.text.max_position_embeddings))
        if kind == "dinov2":
            from .dinov2 import load_dinov2

            return cls(kind, folder, load_dinov2(folder))
        raise FeatureModelError(f"{folder}: unknown feature model {kind!r}")

    @property
    def identity(self) -> str:
        return f"{self.kind}:{_sha256(self.folder / 'model.safetensors')}"

    def image_features(self, images: list[np.ndarray]) -> np.ndarray:
        """A batch of HWC uint8 RGB images -> [B, D] float32."""
        if self.kind == "inception":
            # pytorch-fid batches same-sized images; resizing each first allows mixed sizes.
            x = mx.concatenate([self.model.resize_input(mx.array(to_float(im))[None]) for im in images])
            out = self.model.pool3(2 * x - 1)
        elif self.kind == "clip":
            size = self.model.image_size
            out = self.model.image_embeds(mx.array(np.stack([clip_pixels(im, size) for im in images])))
        else:
            out = self.model(mx.array(np.stack([dinov2_pixels(im) for im in images])))
        return np.array(out.astype(mx.float32))

    def text_features(self, prompts: list[str], batch_size: int = 32) -> np.ndarray:
        if self.kind != "clip":
            raise FeatureModelError(f"{self.folder}: a {self.kind} model has no text tower; "
                                    "CLIP score needs a CLIP model")
        out = []
        for i in range(0, len(prompts), batch_size):
            ids = mx.array(self.tokenizer(prompts[i:i + batch_size]))
            out.append(np.array(self.model.text_embeds(ids)))
        return np.concatenate(out)


@dataclass
class FolderFeatures:
    features: np.ndarray  # [N, D] float32
    paths: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    cached: bool = False


def set_key(model: FeatureModel, paths: list[Path]) -> str:
    h = hashlib.sha256(f"{model.identity}|preprocess={PREPROCESS_VERSION}".encode())
    for digest in sorted(_sha256(p) for p in paths):
        h.update(digest.encode())
    return h.hexdigest()[:32]


def _atomic_npz(path: Path, **arrays) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def folder_features(model: FeatureModel, images: ImageList, batch_size: int = 16, cache: bool = True,
                    cache_dir: Path | None = None, progress: bool = True, desc: str | None = None) -> FolderFeatures:
    """Features of every readable image of `images` (see the module docstring for the cache)."""
    cache_file = None
    if cache:
        cache_file = (cache_dir or cache_root() / "eval-features") / f"{model.kind}-{set_key(model, images.paths)}.npz"
        if cache_file.exists():
            with np.load(cache_file) as z:
                row = {str(d): i for i, d in enumerate(z["digests"])}
                feats = z["features"]
            digests = [_sha256(p) for p in images.paths]
            if all(d in row for d in digests):  # the key says so; a damaged file is simply recomputed
                return FolderFeatures(feats[[row[d] for d in digests]], list(images.paths), list(images.skipped),
                                      cached=True)
    feats, used, skipped = [], [], list(images.skipped)
    bar = tqdm(total=len(images.paths), desc=desc or f"{model.kind} features", unit="img", disable=not progress)
    for i in range(0, len(images.paths), batch_size):
        batch, batch_paths = [], []
        for p in images.paths[i:i + batch_size]:
            try:
                batch.append(read_rgb(p))
                batch_paths.append(p)
            except OSError as e:
                logger.warning("skipping %s: cannot decode (%s)", p, e)
                skipped.append((p, f"{type(e).__name__}: {e}"))
        if batch:
            feats.append(model.image_features(batch))
            used += batch_paths
        bar.update(len(images.paths[i:i + batch_size]))
    bar.close()
    if not used:
        raise FeatureModelError(f"{images.folder}: no image could be decoded")
    out = FolderFeatures(np.concatenate(feats), used, skipped)
    if cache_file is not None and len(used) == len(images.paths):
        _atomic_npz(cache_file, features=out.features, digests=np.array([_sha256(p) for p in used]))
    return out
