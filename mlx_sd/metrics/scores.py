"""The metrics, as the implementations users compare against compute them (numpy, float64).

- `frechet_distance`: pytorch-fid's `calculate_frechet_distance` (scipy `sqrtm`, an eps offset on
  the diagonals when the product is singular, imaginary parts dropped when negligible).
  FID is FD on InceptionV3 pool3 features; FD-DINOv2 and FD-CLIP are FD on those models' features.
  FD is biased by sample count: compare values only at equal N against the same reference set.
- `kid`: torch-fidelity's KID defaults: 100 subsets of 1000 drawn without replacement by
  `np.random.RandomState(2020)`, polynomial kernel (x.y / d + 1)^3, unbiased MMD^2; mean and std.
- `clip_scores`: torchmetrics' CLIPScore per image: 100 x cosine of the image and text embeddings;
  `clip_score` is the mean clamped at 0, as torchmetrics reports it.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..errors import MlxSdError


class MetricError(MlxSdError, ValueError):
    pass


def require_scipy():
    """scipy.linalg, or a MetricError saying how to install it (checked before any feature is computed)."""
    try:
        from scipy import linalg
    except ImportError:
        raise MetricError("Fréchet distances (FID, FD-DINOv2, FD-CLIP) need scipy: pip install 'mlx-sd-lora[eval]' "
                          "(or pip install scipy)") from None
    return linalg


def _sqrtm(a: np.ndarray) -> np.ndarray:
    linalg = require_scipy()
    with warnings.catch_warnings():
        # fewer images than feature dimensions make S1 S2 singular; the result is still the one
        # pytorch-fid reports, and `mlx-sd-eval` states the rank problem in its notes instead
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(a)


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (unbiased, N - 1) of features [N, D], in float64."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise MetricError(f"need at least 2 feature vectors to estimate a covariance, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)) (Dowson & Landau), pytorch-fid's computation."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise MetricError(f"feature sizes differ: {mu1.shape} vs {mu2.shape}; were both sets made by the same model?")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise MetricError(f"Fréchet distance: sqrtm has an imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    m = k_xx.shape[0]
    sum_xx = k_xx.sum() - np.trace(k_xx)
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return float((sum_xx + sum_yy) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def kid(features1: np.ndarray, features2: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        degree: int = 3, gamma: float | None = None, coef0: float = 1.0, seed: int = 2020,
        reduce_subset: bool = False) -> dict:
    """Kernel Inception Distance: {"mean", "std", "subset_size", "subsets"}.

    With fewer images than `subset_size` in either set this raises, as torch-fidelity does, unless
    `reduce_subset`: then the subset size becomes the smaller set's size (reported in the result).
    The kernel runs in the features' own dtype, as torch-fidelity's does.
    """
    n1, n2 = len(features1), len(features2)
    if min(n1, n2) < subset_size:
        if not reduce_subset:
            raise MetricError(f"KID subset size {subset_size} is larger than a set ({n1} and {n2} images); "
                              "use more images or a smaller --kid-subset-size")
        subset_size = min(n1, n2)
    if subset_size < 2:
        raise MetricError(f"KID needs at least 2 images per set, got {n1} and {n2}")
    g = 1.0 / features1.shape[1] if gamma is None else gamma

    def kernel(x, y):
        return (np.matmul(x, y.T) * g + coef0) ** degree

    rng = np.random.RandomState(seed)
    mmds = np.zeros(subsets)
    for i in range(subsets):
        f1 = features1[rng.choice(n1, subset_size, replace=False)]
        f2 = features2[rng.choice(n2, subset_size, replace=False)]
        mmds[i] = _mmd2_unbiased(kernel(f1, f1), kernel(f1, f2), kernel(f2, f2))
    return {"mean": float(np.mean(mmds)), "std": float(np.std(mmds)), "subset_size": subset_size, "subsets": subsets}


def clip_scores(image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
    """Per-image CLIP score [N]: 100 x cosine(image_i, text_i) (not clamped)."""
    a = np.asarray(image_embeds, np.float64)
    b = np.asarray(text_embeds, np.float64)
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return 100.0 * (a * b).sum(axis=-1)


def clip_score(image_embeds: np.ndarray, text_embeds: np.ndarray) -> float:
    """torchmetrics' CLIPScore: max(mean over images of 100 x cosine, 0)."""
    return max(float(clip_scores(image_embeds, text_embeds).mean()), 0.0)
