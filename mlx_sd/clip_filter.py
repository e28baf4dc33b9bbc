"""`mlx-sd-generate --min_clip_score`: each image scored against its prompt by a converted CLIP model.

The score is the per-image CLIP score, 100 x cosine(image embedding, text embedding)
(`mlx_sd.metrics.scores.clip_scores`, the value torchmetrics' CLIPScore averages). Images come as
HWC uint8 RGB, exactly as saved; the CLIP model is a folder made by
`python -m convert --feature-model clip SOURCE OUT`. Images under the threshold are kept in
`rejected/` with their score, never deleted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import MlxSdError
from .generate_folder import GenerateError


class ClipFilter:
    """Scores batches of images; the text embedding of each distinct prompt is computed once."""

    def __init__(self, folder: str | Path, threshold: float):
        from .metrics.features import FeatureModel

        try:
            self.model = FeatureModel.load(folder)
        except MlxSdError as e:
            raise GenerateError(f"--clip_model: {e}") from None
        if self.model.kind != "clip":
            raise GenerateError(f"--clip_model {folder}: a converted {self.model.kind} model; --min_clip_score "
                                "needs a CLIP model (python -m convert --feature-model clip SOURCE OUT)")
        self.threshold = threshold
        self._text: dict[str, np.ndarray] = {}

    def scores(self, images, prompts: list[str]) -> np.ndarray:
        """[B] CLIP scores of uint8 images [B, H, W, 3] against their prompts."""
        from .metrics.scores import clip_scores

        new = [p for p in dict.fromkeys(prompts) if p not in self._text]
        if new:
            self._text.update(zip(new, self.model.text_features(new)))
        image = self.model.image_features(list(images))
        return clip_scores(image, np.stack([self._text[p] for p in prompts]))


def summary(records: list[dict], threshold: float, worst: int = 5) -> list[str]:
    """The table printed at the end: score statistics of kept and set-aside images, and the prompts
    with the most images set aside (records carry "clip_score"; the whole folder, resumed runs too)."""
    scored = [r for r in records if "clip_score" in r]
    if not scored:
        return []
    lines = [f"CLIP filter (--min_clip_score {threshold:g}): {len(scored)} images scored",
             f"  {'':10} {'images':>7} {'min':>7} {'median':>7} {'mean':>7} {'max':>7}"]
    for label, rows in (("kept", [r for r in scored if r["clip_score"] >= threshold]),
                        ("set aside", [r for r in scored if r["clip_score"] < threshold])):
        s = np.array([r["clip_score"] for r in rows])
        stats = f"{s.min():7.2f} {np.median(s):7.2f} {s.mean():7.2f} {s.max():7.2f}" if len(s) else f"{'-':>7}" * 4
        lines.append(f"  {label:10} {len(rows):7d} {stats}")
    per_prompt: dict[str, list[int]] = {}
    for r in scored:
        per_prompt.setdefault(r["text"], [0, 0])[r["clip_score"] < threshold] += 1
    bad = sorted(((v[1], v[0] + v[1], p) for p, v in per_prompt.items() if v[1]), key=lambda t: (-t[0] / t[1], t[2]))
    if bad:
        lines.append("  prompts with the most images set aside:")
        lines += [f"  {n:5d}/{total:<5d} {p[:100]}" for n, total, p in bad[:worst]]
    return lines
