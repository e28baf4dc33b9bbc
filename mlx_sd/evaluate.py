"""What `mlx-sd-eval` computes: two folders compared, a folder scored against its captions, a run's
checkpoints ranked. Each function returns a plain dict (written as JSON by the CLI).

Metric keys: `fid` (InceptionV3 pool3), `kid_mean`/`kid_std` (same features, torch-fidelity's KID),
`fd_dinov2`, `fd_clip` (Fréchet distance on DINOv2 / CLIP image features), `clip_score`
(torchmetrics' CLIPScore, 0-100). Lower is better except for `clip_score`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from .data import DataError, read_captions
from .metrics.features import FeatureModel, folder_features
from .metrics.images import ImageFolderError, ImageList, list_images
from .metrics.scores import MetricError, clip_scores, frechet_distance, gaussian_stats, kid

FID_FULL_RANK = 2048
LOWER_IS_BETTER = {"fid": True, "kid_mean": True, "fd_dinov2": True, "fd_clip": True, "clip_score": False}
FD_KEYS = {"inception": "fid", "dinov2": "fd_dinov2", "clip": "fd_clip"}


def read_captions_file(folder: str | Path, images: ImageList) -> list[tuple[Path, str]]:
    """(image, caption) for every readable image named in the folder's captions.json / metadata.jsonl.

    The caption formats are the training data's (`mlx_sd.data.read_captions`).
    """
    try:
        _, records = read_captions(folder)
    except DataError as e:
        raise ImageFolderError(f"{e}; CLIP score needs each image's prompt") from None
    by_name = {Path(n).name: t for n, t in records if t}
    out = [(p, by_name[p.name]) for p in images.paths if p.name in by_name]
    if not out:
        raise ImageFolderError(f"{folder}: none of the {len(records)} captions names a readable image "
                               f"in {images.folder}")
    return out


def compare_folders(real: str | Path, generated: str | Path, models: list[FeatureModel], *,
                    kid_subsets: int = 100, kid_subset_size: int = 1000, batch_size: int = 16,
                    cache: bool = True, progress: bool = True) -> dict:
    """FID + KID (Inception), FD-DINOv2, FD-CLIP of `generated` against `real`, for each model given.

    The reference set's features are cached by content; the generated set's are cached too, so a
    re-run is cheap. Too few images for a KID subset is a stated reduction, not an error.
    """
    if not models:
        raise MetricError("no feature model given (--inception, --dinov2, --clip)")
    real_images, gen_images = list_images(real), list_images(generated)
    out: dict = {"real": str(real_images.folder), "generated": str(gen_images.folder), "notes": []}
    for m in models:
        fr = folder_features(m, real_images, batch_size, cache, progress=progress, desc=f"{m.kind}: real")
        fg = folder_features(m, gen_images, batch_size, cache, progress=progress, desc=f"{m.kind}: generated")
        out["n_real"], out["n_generated"] = len(fr.paths), len(fg.paths)
        out["skipped"] = sorted({f"{p}: {why}" for p, why in fr.skipped + fg.skipped})
        key = FD_KEYS[m.kind]
        out[key] = frechet_distance(*gaussian_stats(fr.features), *gaussian_stats(fg.features))
        if m.kind == "inception":
            k = kid(fr.features, fg.features, subsets=kid_subsets, subset_size=kid_subset_size, reduce_subset=True)
            out.update(kid_mean=k["mean"], kid_std=k["std"], kid_subset_size=k["subset_size"], kid_subsets=k["subsets"])
            if k["subset_size"] < kid_subset_size:
                out["notes"].append(f"KID subset size reduced from {kid_subset_size} to {k['subset_size']} "
                                    "(the smaller set's size)")
        n = min(len(fr.paths), len(fg.paths))
        if n < fr.features.shape[1] and not any("covariance" in s for s in out["notes"]):
            out["notes"].append(f"{n} images < {fr.features.shape[1]} feature dimensions: the covariances are not "
                                "full rank; Fréchet distances are comparable only at equal N against the same "
                                "reference")
        if len(fr.paths) != len(fg.paths):
            out["notes"].append(f"the sets differ in size ({len(fr.paths)} vs {len(fg.paths)}); FD is biased by N")
    out["notes"] = sorted(set(out["notes"]))
    return out


def score_captions(folder: str | Path, clip: FeatureModel, *, batch_size: int = 16, cache: bool = True,
                   progress: bool = True) -> dict:
    """CLIP score of every image against its caption: overall (torchmetrics' value) and per prompt."""
    images = list_images(folder)
    pairs = read_captions_file(folder, images)
    feats = folder_features(clip, images, batch_size, cache, progress=progress, desc="clip: images")
    caption = {p: t for p, t in pairs}
    rows = [(i, caption[p]) for i, p in enumerate(feats.paths) if p in caption]
    if not rows:
        raise MetricError(f"{folder}: no decodable image has a caption")
    prompts = sorted({t for _, t in rows})
    text = dict(zip(prompts, clip.text_features(prompts)))
    scores = clip_scores(feats.features[[i for i, _ in rows]], np.stack([text[t] for _, t in rows]))
    per_prompt: dict[str, list[float]] = defaultdict(list)
    for s, (_, t) in zip(scores, rows):
        per_prompt[t].append(float(s))
    return {
        "folder": str(images.folder),
        "clip_score": max(float(scores.mean()), 0.0),
        "n": len(rows),
        "uncaptioned": len(feats.paths) - len(rows),
        "skipped": [f"{p}: {why}" for p, why in feats.skipped],
        "per_prompt": {t: {"clip_score": max(float(np.mean(v)), 0.0), "n": len(v)} for t, v in per_prompt.items()},
    }


_VALIDATION = re.compile(r"^epoch\d+_step(\d+)_prompt(\d+)_img(\d+)\.png$")


def validation_sets(validation_dir: Path) -> dict[int, list[tuple[Path, int]]]:
    """{step: [(image, prompt index)]} from train.py's `validation/epoch..._step..._prompt{p}_img{i}.png`."""
    sets: dict[int, list[tuple[Path, int]]] = defaultdict(list)
    for p in sorted(Path(validation_dir).glob("*.png")):
        m = _VALIDATION.match(p.name)
        if m:
            sets[int(m.group(1))].append((p, int(m.group(2))))
    return dict(sorted(sets.items()))


def best_row(rows: list[dict], metric: str) -> dict | None:
    scored = [r for r in rows if isinstance(r.get(metric), (int, float))]
    if not scored:
        return None
    sign = 1 if LOWER_IS_BETTER[metric] else -1
    return min(scored, key=lambda r: sign * r[metric])


def plot_metrics(rows: list[dict], metrics: list[str], out: Path) -> Path | None:
    """One small panel per metric against the step, drawn with PIL (no plotting library needed)."""
    from PIL import Image, ImageDraw

    metrics = [m for m in metrics if sum(isinstance(r.get(m), (int, float)) for r in rows) >= 1]
    if not metrics:
        return None
    W, H, pad = 600, 220, 45
    im = Image.new("RGB", (W, H * len(metrics)), "white")
    d = ImageDraw.Draw(im)
    for k, m in enumerate(metrics):
        pts = [(r["step"], r[m]) for r in rows if isinstance(r.get(m), (int, float))]
        top = k * H
        s0, s1 = min(p[0] for p in pts), max(p[0] for p in pts)
        lo, hi = min(p[1] for p in pts), max(p[1] for p in pts)
        s1, hi = (s1 if s1 > s0 else s0 + 1), (hi if hi > lo else lo + 1e-8)

        def xy(s, v, s0=s0, s1=s1, lo=lo, hi=hi, top=top):
            return pad + (s - s0) / (s1 - s0) * (W - 2 * pad), top + H - pad - (v - lo) / (hi - lo) * (H - 2 * pad)

        d.rectangle([pad, top + pad, W - pad, top + H - pad], outline=(180, 180, 180))
        if len(pts) > 1:
            d.line([xy(*p) for p in pts], fill=(20, 60, 160), width=2)
        for p in pts:
            x, y = xy(*p)
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(20, 60, 160))
        better = "lower" if LOWER_IS_BETTER[m] else "higher"
        d.text((pad, top + 12), f"{m} ({better} is better)", fill="black")
        d.text((5, top + pad - 5), f"{hi:.4g}", fill="black")
        d.text((5, top + H - pad - 5), f"{lo:.4g}", fill="black")
        d.text((pad, top + H - pad + 8), f"step {s0}", fill="black")
        d.text((W - pad - 70, top + H - pad + 8), f"step {s1}", fill="black")
    im.save(out)
    return out


def evaluate_set(images, captions: dict[Path, str] | None, real, models: list[FeatureModel], *,
                 kid_subsets: int = 100, kid_subset_size: int = 1000, batch_size: int = 16,
                 cache: bool = True, progress: bool = True) -> dict:
    """Every metric the given models allow for one image set (an `ImageList`).

    With `real` (an `ImageList`): FID/KID, FD-DINOv2, FD-CLIP against it. With `captions`
    ({image: prompt}) and a CLIP model: the CLIP score.
    """
    out: dict = {"n": len(images.paths), "notes": []}
    for m in models:
        feats = folder_features(m, images, batch_size, cache, progress=progress, desc=f"{m.kind} features")
        if real is not None:
            ref = folder_features(m, real, batch_size, cache, progress=progress, desc=f"{m.kind}: reference")
            out[FD_KEYS[m.kind]] = frechet_distance(*gaussian_stats(ref.features), *gaussian_stats(feats.features))
            if m.kind == "inception":
                k = kid(ref.features, feats.features, subsets=kid_subsets, subset_size=kid_subset_size,
                        reduce_subset=True)
                out.update(kid_mean=k["mean"], kid_std=k["std"], kid_subset_size=k["subset_size"])
                if k["subset_size"] < kid_subset_size:
                    out["notes"].append(f"KID subset size reduced from {kid_subset_size} to {k['subset_size']}")
            n = min(len(ref.paths), len(feats.paths))
            if n < feats.features.shape[1]:
                out["notes"].append(f"{m.kind}: {n} images < {feats.features.shape[1]} feature dimensions (covariance "
                                    "not full rank); compare only at equal N against the same reference")
        if m.kind == "clip" and captions:
            rows = [(i, captions[p]) for i, p in enumerate(feats.paths) if p in captions]
            prompts = sorted({t for _, t in rows})
            text = dict(zip(prompts, m.text_features(prompts)))
            scores = clip_scores(feats.features[[i for i, _ in rows]], np.stack([text[t] for _, t in rows]))
            out["clip_score"] = max(float(scores.mean()), 0.0)
    return out
