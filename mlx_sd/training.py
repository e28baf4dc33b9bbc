"""The training step: loss, compiled gradient accumulation and update, LR schedules.

Latents are NHWC. `grad_step` adds one micro-batch's gradients to an accumulator and
`apply_update` turns the accumulated sum into one AdamW update (mean over micro-batches, so
batch b x accumulation k equals one batch of b*k), with global-norm clipping. Both are compiled
with explicit state (`unet.state`, `optimizer.state`).
Every random draw of the step is keyed per sample: `grad_step` takes one key per sample [b, 2]
(`sample_keys`: from seed, update and the sample's position in the update's global batch, see
`mlx_sd.data.step_key`) as an argument, and each draw for sample i takes its own sub-key of
key i (`PURPOSES`): latent sample, noise, offset noise, timestep, and the dropout mask of each
LoRA layer (`lora.layers.dropout_keys`). Nothing depends on MLX's global generator, so a
gradient-checkpointed block recomputed in the backward pass sees the forward pass's masks, a
resumed run draws what the uninterrupted one drew, and a sample draws the same values whatever
micro-batch, rank or accumulation step it lands in.
Data-parallel (`group` of N ranks, see mlx_sd.distributed): each rank computes its own samples'
gradients, and `apply_update` averages them over the ranks.
Text-encoder LoRA (`text_encoder` + its own `text_optimizer`, the same LR schedule at its own peak
LR): the micro-batch brings token ids [b, 77] instead of embeddings, the embeddings are computed in
`grad_step`, and both adapters' gradients accumulate, average over ranks and clip as one vector.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from lora.layers import dropout_keys, lora_layers

from .data import step_key
from .schedulers import NoiseSchedule

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def lr_factor(name: str, warmup: int, total: int, num_cycles: float | None = None, power: float = 1.0,
              lr_end_ratio: float = 1e-7 / 1e-4) -> Callable[[mx.array], mx.array]:
    """Multiplier of the base LR at optimizer step `s` (0 = first update), as diffusers' get_scheduler."""
    if name not in LR_SCHEDULERS:
        raise ValueError(f"unknown lr scheduler {name!r}; choose from {', '.join(LR_SCHEDULERS)}")
    w = float(max(warmup, 0))
    T = float(max(total, 1))

    def warm(s):
        return s / max(1.0, w)

    def f(step):
        s = mx.array(step, dtype=mx.float32)
        if name == "constant":
            return mx.ones_like(s)
        if name == "constant_with_warmup":
            return mx.where(s < w, warm(s), 1.0)
        progress = (s - w) / max(1.0, T - w)
        if name == "linear":
            after = mx.maximum(0.0, (T - s) / max(1.0, T - w))
        elif name == "cosine":
            c = 0.5 if num_cycles is None else num_cycles
            after = mx.maximum(0.0, 0.5 * (1.0 + mx.cos(math.pi * c * 2.0 * progress)))
        elif name == "cosine_with_restarts":
            c = 1.0 if num_cycles is None else num_cycles
            after = mx.where(progress >= 1.0, 0.0,
                             mx.maximum(0.0, 0.5 * (1.0 + mx.cos(math.pi * ((c * progress) % 1.0)))))
        else:  # polynomial decay to lr_end (diffusers: lr_end=1e-7 absolute; given here as a ratio)
            after = mx.where(s > T, lr_end_ratio,
                             (1 - lr_end_ratio) * (1 - progress) ** power + lr_end_ratio)
        return mx.where(s < w, warm(s), after)

    return f


class ScheduledAdamW(optim.AdamW):
    """AdamW with torch's semantics (bias correction on) and an LR schedule it can be asked about."""

    def __init__(self, schedule: Callable[[mx.array], mx.array], **kwargs):
        super().__init__(learning_rate=schedule, bias_correction=True, **kwargs)
        self.schedule = schedule

    def lr_at(self, step: int | None = None) -> float:
        """The LR of update `step` (0 = the first); by default the next update's."""
        return float(self.schedule(self.step if step is None else step))

    def skip_update(self) -> None:
        """Count an update that was not applied, so the schedule stays aligned with the step number."""
        self.state["step"] = self.step + 1


def make_optimizer(lr: float, schedule: str, warmup: int, total: int, betas=(0.9, 0.999),
                   weight_decay: float = 1e-2, eps: float = 1e-8, num_cycles: float | None = None,
                   power: float = 1.0) -> ScheduledAdamW:
    """AdamW with the named LR schedule folded in (diffusers' get_scheduler names)."""
    factor = lr_factor(schedule, warmup, total, num_cycles, power, lr_end_ratio=1e-7 / lr)
    return ScheduledAdamW(lambda step: lr * factor(step), betas=list(betas), eps=eps, weight_decay=weight_decay)


@dataclass(frozen=True)
class LossConfig:
    snr_gamma: float = 0.0  # min-SNR weighting (0 = off)
    noise_offset: float = 0.0
    scaling_factor: float = 0.18215


def offset_noise(noise: mx.array, offset_noise: mx.array, noise_offset: float) -> mx.array:
    """Noise-offset composition (crosslabs' offset noise, as diffusers' scripts add it): base noise
    [B, H, W, C] plus `noise_offset` times one value per sample and channel, `offset_noise` [B, 1, 1, C]."""
    return noise + noise_offset * offset_noise


def loss_fn(unet: nn.Module, latents: mx.array, ctx: mx.array, noise: mx.array, t: mx.array,
            schedule: NoiseSchedule, snr_gamma: float = 0.0) -> mx.array:
    """MSE between the UNet's prediction and the target (noise, or v), in float32."""
    noisy = schedule.add_noise(latents, noise, t)
    pred = unet(noisy, t, ctx).astype(mx.float32)
    target = schedule.target(latents, noise, t).astype(mx.float32)
    per_sample = mx.mean(mx.square(pred - target), axis=(1, 2, 3))
    if snr_gamma > 0:  # min-SNR-gamma (Hang et al. 2023), as diffusers' training scripts weight it
        snr = schedule.snr(t)
        w = mx.minimum(snr, snr_gamma)
        w = w / (snr + 1.0) if schedule.prediction_type == "v_prediction" else w / snr
        per_sample = per_sample * w
    return mx.mean(per_sample)


# The sub-keys of a sample's key, one per kind of draw (fixed: changing them changes every run).
PURPOSES = ("latent_sample", "noise", "offset_noise", "timestep", "unet_dropout", "text_encoder_dropout")


def sample_keys(seed: int, update: int, positions) -> np.ndarray:
    """[b, 2] uint32 keys (`mx.random.key`'s form) of the samples at `positions` of update `update`'s global batch."""
    return np.stack([np.random.SeedSequence(step_key(seed, update, int(p))).generate_state(2) for p in positions])


def purpose_key(keys: mx.array, i: int, purpose: str) -> mx.array:
    """Sample i's sub-key for one kind of draw."""
    return mx.random.split(keys[i], len(PURPOSES))[PURPOSES.index(purpose)]


def per_sample(keys: mx.array, purpose: str, draw: Callable[[mx.array], mx.array]) -> mx.array:
    """`draw(key)` for every sample with its own sub-key, stacked: [b, ...]."""
    return mx.stack([draw(purpose_key(keys, i, purpose)) for i in range(keys.shape[0])])


def draw_noise(latents: mx.array, schedule: NoiseSchedule, noise_offset: float, keys: mx.array):
    """Noise like `latents` and one timestep per sample, each sample from its own key."""
    shape, dtype = latents.shape[1:], latents.dtype
    noise = per_sample(keys, "noise", lambda k: mx.random.normal(shape, dtype=dtype, key=k))
    if noise_offset > 0:
        C = latents.shape[-1]
        noise = offset_noise(noise, per_sample(keys, "offset_noise",
                                               lambda k: mx.random.normal((1, 1, C), dtype=dtype, key=k)), noise_offset)
    t = per_sample(keys, "timestep", lambda k: mx.random.randint(0, schedule.num_train_timesteps, (), key=k))
    return noise, t


def sample_latents(mean: mx.array, std: mx.array, scaling_factor: float, keys: mx.array) -> mx.array:
    """One draw from the VAE posterior N(mean, std^2) per sample, scaled for the UNet."""
    eps = per_sample(keys, "latent_sample", lambda k: mx.random.normal(mean.shape[1:], dtype=mean.dtype, key=k))
    return (mean + std * eps) * scaling_factor


def layer_keys(keys: mx.array, purpose: str, n_layers: int) -> mx.array:
    """[b, n_layers, 2]: sample i's dropout key for each of a model's LoRA layers (`lora.layers.dropout_keys`)."""
    return per_sample(keys, purpose, lambda k: mx.random.split(k, n_layers))


class LoRAModels(nn.Module):
    """The UNet and the text encoder as one module: one gradient tree `{"unet": ..., "text_encoder": ...}`."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder


def text_embeddings(text_encoder: nn.Module, ids) -> mx.array:
    """[b, 77, D] embeddings of token ids in eval mode (no LoRA dropout), for validation and val_loss."""
    was_training = text_encoder.training
    text_encoder.eval()
    try:
        out = text_encoder(mx.array(ids))
        mx.eval(out)
        return out
    finally:
        text_encoder.train(was_training)


class TrainStep:
    """Compiled `grad_step` / `apply_update` pair for a LoRA-injected UNet (and text encoder)."""

    def __init__(self, unet: nn.Module, optimizer: optim.Optimizer, schedule: NoiseSchedule,
                 loss: LossConfig, grad_accum: int = 1, max_grad_norm: float = 1.0, compile: bool = True,
                 draw: Callable | None = None, sample: Callable | None = None,
                 group: mx.distributed.Group | None = None, text_encoder: nn.Module | None = None,
                 text_optimizer: optim.Optimizer | None = None):
        """`draw(latents, keys) -> (noise, t)` and `sample(mean, std, keys) -> latents` replace the
        keyed draws (tests use deterministic ones). With a `group`
        this process is one rank of a data-parallel run; with a `text_encoder` (and its
        `text_optimizer`) `grad_step` takes token ids and trains its LoRA too (module docstring)."""
        if (text_encoder is None) != (text_optimizer is None):
            raise ValueError("a trained text encoder needs its own optimizer (and the reverse)")
        self.unet, self.optimizer, self.schedule = unet, optimizer, schedule
        self.text_encoder, self.text_optimizer = text_encoder, text_optimizer
        draw = draw or (lambda lat, keys: draw_noise(lat, schedule, loss.noise_offset, keys))
        sample = sample or (lambda mean, std, keys: sample_latents(mean, std, loss.scaling_factor, keys))
        self.grad_accum = grad_accum
        if text_encoder is None:
            self.trained = unet
            value_and_grad = nn.value_and_grad(
                unet, lambda m, lat, ctx, noise, t: loss_fn(m, lat, ctx, noise, t, schedule, loss.snr_gamma))
        else:
            self.trained = LoRAModels(unet, text_encoder)
            value_and_grad = nn.value_and_grad(  # the embeddings are part of the differentiated step
                self.trained, lambda m, lat, ids, noise, t: loss_fn(m.unet, lat, m.text_encoder(ids), noise, t,
                                                                    schedule, loss.snr_gamma))
        trained = self.trained
        # Models whose LoRA layers drop out, with their dropout purpose and number of LoRA layers.
        dropping = [(m, purpose, len(lora_layers(m))) for m, purpose in
                    ((unet, "unet_dropout"), (text_encoder, "text_encoder_dropout"))
                    if m is not None and any(x.dropout is not None for x in lora_layers(m).values())]

        def grad_step(mean, std, ctx, keys, acc):
            """`ctx`: text embeddings [b, 77, D], or token ids [b, 77] when the text encoder trains;
            `keys`: the samples' keys [b, 2] uint32 (`sample_keys`)."""
            latents = sample(mean, std, keys)
            noise, t = draw(latents, keys)
            with ExitStack() as masks:  # traced inside the step: recomputation reuses the same keys
                for m, purpose, n in dropping:
                    masks.enter_context(dropout_keys(m, layer_keys(keys, purpose, n)))
                value, grads = value_and_grad(trained, latents, ctx, noise, t)
            return value, tree_map(mx.add, acc, grads)

        def apply_update(acc):
            grads = tree_map(lambda g: g / grad_accum, acc)
            if group is not None:  # once per update, before clipping: the global batch's gradient
                grads = nn.average_gradients(grads, group)
            if max_grad_norm > 0:
                grads, norm = optim.clip_grad_norm(grads, max_grad_norm)
            else:
                norm = mx.sqrt(sum(mx.sum(mx.square(g)) for g in _leaves(grads)))
            if text_encoder is None:
                optimizer.update(unet, grads)
            else:
                optimizer.update(unet, grads["unet"])
                text_optimizer.update(text_encoder, grads["text_encoder"])
            return norm

        state = [unet.state, optimizer.state]
        if text_encoder is not None:
            state += [text_encoder.state, text_optimizer.state]
        self.state = state
        if compile:
            grad_step = partial(mx.compile, inputs=state, outputs=state)(grad_step)
            apply_update = partial(mx.compile, inputs=state, outputs=state)(apply_update)
        self.grad_step, self.apply_update = grad_step, apply_update

    def zero_grads(self):
        return tree_map(mx.zeros_like, self.trained.trainable_parameters())

    def trained_state(self) -> list:
        """What an update changes (LoRA weights, optimizer states), to evaluate after it."""
        out = [self.unet.trainable_parameters(), self.optimizer.state]
        if self.text_encoder is not None:
            out += [self.text_encoder.trainable_parameters(), self.text_optimizer.state]
        return out

    def skip_update(self) -> None:
        """Count an update that was not applied (non-finite loss) in every optimizer's schedule."""
        for opt in (self.optimizer, self.text_optimizer):
            if opt is not None:
                opt.skip_update()

    def lr(self) -> float:
        """The LR the next update will use."""
        if isinstance(self.optimizer, ScheduledAdamW):
            return self.optimizer.lr_at()
        return float(self.optimizer.learning_rate)


def _leaves(tree):
    return [v for _, v in tree_flatten(tree)]
