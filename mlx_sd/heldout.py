"""Held-out validation loss: images kept out of training, scored at fixed timesteps and fixed noise.

The value is a deterministic function of the adapter weights (kohya's validation loss, 2025):
- the split (`split_holdout`) depends only on (seed, file name), not on the order of the files;
- every held-out image i is scored at K stratified timesteps t_k = floor((k + 0.5) T / K) with
  noise drawn by numpy from the key (seed, i, k), so neither MLX's random state, the training
  batch size, nor a resume changes it;
- the latent is the VAE posterior mean (no sampling), scaled by the VAE's scaling factor;
- items are evaluated in fixed chunks of `VAL_CHUNK`, independent of the training batch.

Layouts: latents [N, h, w, 4] NHWC float32 (scaled), text embeddings [N, 77, D] float32. The
loss is the mean over images and timesteps of the per-item MSE (float32 per item, float64 sum),
the same quantity (epsilon or v target) the training loss averages.
"""

from __future__ import annotations

import hashlib
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .schedulers import NoiseSchedule

VAL_CHUNK = 4
TIMESTEPS_PER_IMAGE = 4


def split_holdout(names: list[str], fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices) of `names` (file names), both in the input order.

    The held-out set is the round(fraction * n) names (at least 1) ranked first by
    SHA-256(seed, name); at least one image stays in training.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"--validation_split {fraction}: expected a fraction between 0 and 1 (e.g. 0.05)")
    n = len(names)
    k = max(1, round(fraction * n))
    if n - k < 1:
        raise ValueError(f"--validation_split {fraction} of {n} images leaves none for training")
    rank = sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}\0{names[i]}".encode()).hexdigest())
    held = set(rank[:k])
    return [i for i in range(n) if i not in held], [i for i in range(n) if i in held]


def fixed_timesteps(num_train_timesteps: int, per_image: int = TIMESTEPS_PER_IMAGE) -> np.ndarray:
    """Stratified timesteps, the same for every image: floor((k + 0.5) T / K), k = 0..K-1."""
    return np.array([math.floor((k + 0.5) * num_train_timesteps / per_image) for k in range(per_image)], np.int32)


def fixed_noise(image_index: int, k: int, shape: tuple, seed: int = 0) -> np.ndarray:
    """The noise of held-out image `image_index` at its k-th timestep: standard normal, float32."""
    return np.random.default_rng([seed, image_index, k]).standard_normal(shape, dtype=np.float32)


def item_losses(unet: nn.Module, latents: mx.array, ctx: mx.array, noise: mx.array, t: mx.array,
                schedule: NoiseSchedule) -> mx.array:
    """Per-item MSE [B] in float32 between the UNet's prediction and the training target."""
    noisy = schedule.add_noise(latents, noise, t)
    pred = unet(noisy, t, ctx).astype(mx.float32)
    target = schedule.target(latents, noise, t).astype(mx.float32)
    return mx.mean(mx.square(pred - target), axis=(1, 2, 3))


def heldout_loss(unet: nn.Module, schedule: NoiseSchedule, latents: np.ndarray, ctx: np.ndarray, seed: int = 0,
                 per_image: int = TIMESTEPS_PER_IMAGE, chunk: int = VAL_CHUNK) -> float:
    """Mean held-out loss over images x fixed timesteps (see the module docstring); no gradients.

    The UNet is put in eval mode (no LoRA dropout) for the call and restored afterwards.
    """
    if len(latents) == 0:
        raise ValueError("no held-out images")
    ts = fixed_timesteps(schedule.num_train_timesteps, per_image)
    items = [(i, k) for i in range(len(latents)) for k in range(per_image)]
    was_training = unet.training
    unet.eval()
    total = 0.0
    try:
        for s in range(0, len(items), chunk):
            part = items[s:s + chunk]
            lat = mx.array(np.stack([latents[i] for i, _ in part]))
            c = mx.array(np.stack([ctx[i] for i, _ in part]))
            noise = mx.array(np.stack([fixed_noise(i, k, latents.shape[1:], seed) for i, k in part]))
            t = mx.array(np.array([ts[k] for _, k in part], np.int32))
            losses = item_losses(unet, lat, c, noise, t, schedule)
            total += float(np.sum(np.array(losses), dtype=np.float64))
    finally:
        unet.train(was_training)
    return total / len(items)
