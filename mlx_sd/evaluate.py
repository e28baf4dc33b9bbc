"""What `mlx-sd-eval` computes: two folders compared, a folder scored against its captions, a run's
checkpoints ranked. Each function returns a plain dict (written as JSON by the CLI).

Metric keys: `fid` (InceptionV3 pool3), `kid_mean`/`kid_std` (same features, torch-fidelity's KID),
`fd_dinov2`, `fd_clip` (Fréchet distance on DINOv2 / CLIP image features), `clip_score`
(torchmetrics' CLIPScore, 0-100). Lower is better except for `clip_score`.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .data import DataError, read_captions
from .metrics.features import FeatureModel, folder_features
from .metrics.images import ImageFolderError, ImageList, list_images
from .metrics.scores import MetricError, clip_scores, frechet_distance, gaussian_stats, kid, require_scipy

FID_FULL_RANK = 2048
LOWER_IS_BETTER = {"fid": True, "kid_mean": True, "fd_dinov2": True, "fd_clip": True, "clip_score": False}
FD_KEYS = {"inception": "fid", "dinov2": "fd_dinov2", "clip": "fd_clip"}
NEEDS = {"fid": "--real and --inception", "kid_mean": "--real and --inception", "fd_dinov2": "--real and --dinov2",
         "fd_clip": "--real and --clip", "clip_score": "--clip"}


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


def planned_metrics(models: list[FeatureModel], with_real: bool, with_captions: bool) -> list[str]:
    """The metric keys `evaluate_set` computes with these models, with or without a reference set and captions."""
    keys = []
    for m in models:
        if with_real:
            keys += [FD_KEYS[m.kind]] + (["kid_mean"] if m.kind == "inception" else [])
        if m.kind == "clip" and with_captions:
            keys.append("clip_score")
    return keys


def check_plan(models: list[FeatureModel], real: ImageList | None, sizes: dict[str, int], *,
               with_captions: bool = False, select: str | None = None) -> list[str]:
    """What would fail after the features are computed, raised before: no metric to compute, a model
    that computes nothing, a `select`ed metric that is not computed, Fréchet distances without scipy
    or with fewer than 2 images in a set (`sizes`: {set name: readable images}). Returns the metric keys."""
    if not models:
        raise MetricError("no feature model given (--inception, --dinov2, --clip)")
    if real is None:
        idle = [m.kind for m in models if not (m.kind == "clip" and with_captions)]
        if idle:
            raise MetricError(f"--{idle[0]} compares against reference images: give --real REAL_DIR "
                              f"(without it only --clip's CLIP score is computed)")
    keys = planned_metrics(models, real is not None, with_captions)
    if select is not None and select not in keys:
        raise MetricError(f"--select {select}: not computed with these options (computed: "
                          f"{', '.join(keys) or 'none'}); {select} needs {NEEDS[select]}")
    if real is not None:
        require_scipy()
        small = [f"{name} has {n}" for name, n in {"the reference set": len(real.paths), **sizes}.items() if n < 2]
        if small:
            raise MetricError(f"Fréchet distances and KID need at least 2 images per set: {', '.join(small)}")
    return keys


def compare_folders(real: str | Path, generated: str | Path, models: list[FeatureModel], *,
                    kid_subsets: int = 100, kid_subset_size: int = 1000, batch_size: int = 16,
                    cache: bool = True, progress: bool = True) -> dict:
    """FID + KID (Inception), FD-DINOv2, FD-CLIP of `generated` against `real`, for each model given.

    The reference set's features are cached by content; the generated set's are cached too, so a
    re-run is cheap. Too few images for a KID subset is a stated reduction, not an error.
    """
    real_images, gen_images = list_images(real), list_images(generated)
    check_plan(models, real_images, {str(gen_images.folder): len(gen_images.paths)})
    res = evaluate_set(gen_images, None, real_images, models, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                       batch_size=batch_size, cache=cache, progress=progress)
    counts = res.pop("counts")
    return {"real": str(real_images.folder), "generated": str(gen_images.folder),
            "n_real": min(c["real"] for c in counts.values()),
            "n_generated": min(c["generated"] for c in counts.values()), "counts": counts,
            **{k: v for k, v in res.items() if k != "n"}}


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


def run_settings(run_dir: Path) -> tuple[dict, Path | None]:
    """The settings train.py saved for a run, and the file: the newest `logs/<time>/config.json` (its
    flags plus `model`, the base model's source, and `model_dir`, its converted folder), else the
    newest checkpoint's `trainer_state.json` "config"; ({}, None) when neither is readable."""
    from .checkpoint import STATE_FILE, list_checkpoints

    candidates = [(p, None) for p in sorted((run_dir / "logs").glob("*/config.json"), reverse=True)]
    candidates += [(p / STATE_FILE, "config") for _, p in reversed(list_checkpoints(run_dir / "checkpoints"))]
    for path, key in candidates:
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        cfg = obj.get(key) if key and isinstance(obj, dict) else obj
        if isinstance(cfg, dict):
            return cfg, path
    return {}, None


def run_prompts(cfg: dict, source: Path | None) -> list[str]:
    """The prompts a run's validation rendered, resolved as train.py resolves them (its flag, a .txt
    file of prompts, or the default four); `validation/..._prompt{p}_...` images are numbered in this order."""
    from .train_options import validation_prompts

    vp = cfg.get("validation_prompts")
    try:
        return validation_prompts(SimpleNamespace(validation_prompts=[vp] if isinstance(vp, str) else vp))
    except DataError as e:
        raise MetricError(f"{source}: the run's validation prompts cannot be read: {e}. Give them with "
                          "--prompts_file or --prompt, in the run's order") from None


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


def evaluate_set(images: ImageList, captions: dict[Path, str] | None, real: ImageList | None,
                 models: list[FeatureModel], *, kid_subsets: int = 100, kid_subset_size: int = 1000,
                 batch_size: int = 16, cache: bool = True, progress: bool = True) -> dict:
    """Every metric the given models allow for one image set (call `check_plan` first).

    With `real`: FID/KID, FD-DINOv2, FD-CLIP against it, and `counts` {model: {"real", "generated"}}
    (the images each model could decode). With `captions` ({image: prompt}) and a CLIP model: the
    CLIP score. `skipped` and `notes` gather every model's.
    """
    out: dict = {"n": len(images.paths)}
    notes, skipped, counts = set(), set(), {}
    for m in models:
        feats = folder_features(m, images, batch_size, cache, progress=progress, desc=f"{m.kind} features")
        skipped |= {f"{p}: {why}" for p, why in feats.skipped}
        if real is not None:
            ref = folder_features(m, real, batch_size, cache, progress=progress, desc=f"{m.kind}: reference")
            skipped |= {f"{p}: {why}" for p, why in ref.skipped}
            counts[m.kind] = {"real": len(ref.paths), "generated": len(feats.paths)}
            out[FD_KEYS[m.kind]] = frechet_distance(*gaussian_stats(ref.features), *gaussian_stats(feats.features))
            if m.kind == "inception":
                k = kid(ref.features, feats.features, subsets=kid_subsets, subset_size=kid_subset_size,
                        reduce_subset=True)
                out.update(kid_mean=k["mean"], kid_std=k["std"], kid_subset_size=k["subset_size"],
                           kid_subsets=k["subsets"])
                if k["subset_size"] < kid_subset_size:
                    notes.add(f"KID subset size reduced from {kid_subset_size} to {k['subset_size']} "
                              "(the smaller set's size)")
            n, d = min(len(ref.paths), len(feats.paths)), feats.features.shape[1]
            if n < d:
                notes.add(f"{m.kind}: {n} images < {d} feature dimensions: the covariances are not full rank; "
                          "Fréchet distances are comparable only at equal N against the same reference")
            if len(ref.paths) != len(feats.paths):
                notes.add(f"{m.kind}: the sets differ in size ({len(ref.paths)} reference vs {len(feats.paths)}); "
                          "FD is biased by N")
        if m.kind == "clip" and captions:
            rows = [(i, captions[p]) for i, p in enumerate(feats.paths) if p in captions]
            if rows:
                prompts = sorted({t for _, t in rows})
                text = dict(zip(prompts, m.text_features(prompts)))
                scores = clip_scores(feats.features[[i for i, _ in rows]], np.stack([text[t] for _, t in rows]))
                out["clip_score"] = max(float(scores.mean()), 0.0)
            if len(rows) < len(feats.paths):
                notes.add(f"clip: {len(feats.paths) - len(rows)} images have no caption and were not scored")
    if real is not None:
        out["counts"] = counts
        if len({tuple(c.values()) for c in counts.values()}) > 1:
            notes.add("the models could decode different numbers of images: "
                      + ", ".join(f"{k} {c['generated']} vs {c['real']} reference" for k, c in counts.items()))
    out["notes"], out["skipped"] = sorted(notes), sorted(skipped)
    return out
