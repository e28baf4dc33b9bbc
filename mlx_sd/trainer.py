"""The training loop's parts: where micro-batches come from, and the trainer that runs updates.

`CachedBatches` serves micro-batches from the encoded dataset (`mlx_sd.data.EncodedData`);
`EncodingBatches` encodes each one with the VAE and text encoder (--no_cache), decoding the next
micro-batch's images while the current step runs. Both return `(epoch, mean, std, ctx)` for this
rank's rows of global micro-batch `c`: posterior mean/std NHWC [b, h, w, 4], text embeddings
[b, 77, D]; `captions(c)` gives that micro-batch's captions after caption dropout / tag shuffling,
and `positions(c)` names its samples as (update, positions in the update's global batch), the
names every per-sample draw is keyed by (crops, caption variants, the train step's draws).
When the text encoder trains (`token_ids`, or no text encoder for `EncodingBatches`), the 4th item
is instead the token ids [b, 77] of `captions(c)`, which the train step embeds.

`Trainer` runs updates from a start step to the last: accumulation over micro-batches, NaN
handling, metrics, checkpoints, validation, and a clean stop on SIGINT/SIGTERM (finish the step,
checkpoint, exit 130/143) that every rank of a data-parallel run takes at the same step.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from .captions import CaptionVariants
from .checkpoint import latest_checkpoint, save_checkpoint
from .data import BatchPlan, EncodedData, Sample, crop_key, preprocess
from .distributed import World
from .logs import FILE_ONLY
from .training import sample_keys

logger = logging.getLogger("train")


def batch_positions(plan: BatchPlan, rows: slice, c: int) -> tuple[int, np.ndarray]:
    """(update, positions in its global batch) of this rank's rows of global micro-batch `c`."""
    update, first = plan.locate(c)
    return update, first + np.arange(rows.start or 0, rows.stop)


def batch_captions(plan: BatchPlan, rows: slice, captions: list[str], variants: CaptionVariants, c: int) -> list[str]:
    """This rank's captions of global micro-batch `c`, after the per-step variants (`mlx_sd.captions`)."""
    _, idx, _ = plan(c)
    update, positions = batch_positions(plan, rows, c)
    return variants.for_batch([captions[i] for i in idx[rows]], plan.seed, update, int(positions[0]))


class CachedBatches:
    """Micro-batches from the encoded dataset; `rows` is this rank's slice of the global batch.

    With caption variants, the text embeddings change per step: caption dropout alone needs only the
    empty caption's embedding (computed once, the rest stay cached); tag shuffling encodes the drawn
    captions every step, so the text encoder stays loaded (`text_encoder`, `tokenizer`).
    """

    def __init__(self, plan: BatchPlan, rows: slice, data: EncodedData, captions: list[str] | None = None,
                 variants: CaptionVariants = CaptionVariants(), text_encoder=None, tokenizer=None,
                 token_ids: bool = False):
        self.plan, self.rows, self.data = plan, rows, data
        self.sample_captions, self.variants = captions, variants
        self.text_encoder, self.tokenizer, self.empty = text_encoder, tokenizer, None
        self.token_ids = token_ids
        if variants.active and not variants.shuffle and not token_ids:
            self.empty = np.array(text_encoder(mx.array(tokenizer([""]))))[0]
            self.text_encoder = None  # the rest is cached

    def captions(self, c: int) -> list[str]:
        return batch_captions(self.plan, self.rows, self.sample_captions, self.variants, c)

    def positions(self, c: int) -> tuple[int, np.ndarray]:
        return batch_positions(self.plan, self.rows, c)

    def text(self, c: int, idx: np.ndarray) -> mx.array:
        if self.token_ids:  # the text encoder trains: the step embeds them
            return mx.array(self.tokenizer(self.captions(c)))
        d = self.data
        if not self.variants.active:
            return mx.array(d.text[d.caption_index[idx]])
        caps = self.captions(c)
        if self.empty is not None:
            dropped = np.array([not cap for cap in caps])[:, None, None]
            return mx.array(np.where(dropped, self.empty, d.text[d.caption_index[idx]]))
        return self.text_encoder(mx.array(self.tokenizer(caps)))

    def __call__(self, c: int):
        epoch, idx, flips = self.plan(c)
        idx, flips = idx[self.rows], flips[self.rows]
        d = self.data
        mean, std = d.latents(idx, flips)
        return epoch, mx.array(mean), mx.array(std), self.text(c, idx)

    def close(self) -> None:
        pass


class EncodingBatches:
    """Micro-batches encoded every step, as the original script did (needed for random crops)."""

    def __init__(self, plan: BatchPlan, rows: slice, samples: list[Sample], resolution: int, center_crop: bool,
                 vae, text_encoder, tokenizer, variants: CaptionVariants = CaptionVariants(),
                 sizes: list[tuple[int, int]] | None = None):
        self.plan, self.rows, self.samples, self.variants = plan, rows, samples, variants
        self.sample_captions = [s.caption for s in samples]
        self.sizes = sizes  # (w, h) per sample with buckets
        self.resolution, self.center_crop = resolution, center_crop
        self.encode_image = mx.compile(lambda x: vae.encode(x))
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.loader = ThreadPoolExecutor(1, thread_name_prefix="images")
        self.next: tuple[int, object] | None = None  # (micro-batch, future of its pixels)

    def pixels(self, c: int) -> np.ndarray:
        """Images of micro-batch `c`, this rank's rows; a pure function of (seed, c)."""
        _, idx, flips = self.plan(c)
        update, positions = self.positions(c)
        # Random crops: one generator per (update, position in its global batch), the same on any rank.
        return np.stack([preprocess(self.samples[i].path, self.resolution, self.center_crop, bool(f),
                                    np.random.default_rng(crop_key(self.plan.seed, update, int(p))),
                                    self.sizes[i] if self.sizes else None)
                         for i, f, p in zip(idx[self.rows], flips[self.rows], positions)])

    def __call__(self, c: int):
        epoch = self.plan.epoch_of(c)
        # Decoding the next micro-batch's images overlaps this one's step (PIL releases the GIL).
        future = self.next[1] if self.next and self.next[0] == c else self.loader.submit(self.pixels, c)
        px = future.result()
        self.next = (c + 1, self.loader.submit(self.pixels, c + 1))
        mean, logvar = self.encode_image(mx.array(px))
        ids = mx.array(self.tokenizer(self.captions(c)))
        ctx = ids if self.text_encoder is None else self.text_encoder(ids)  # None: the text encoder trains
        return epoch, mean, mx.exp(0.5 * logvar), ctx

    def captions(self, c: int) -> list[str]:
        return batch_captions(self.plan, self.rows, self.sample_captions, self.variants, c)

    def positions(self, c: int) -> tuple[int, np.ndarray]:
        return batch_positions(self.plan, self.rows, c)

    def close(self) -> None:
        self.loader.shutdown(wait=False, cancel_futures=True)


class StopFlag:
    """SIGINT/SIGTERM ask the loop to finish the step and checkpoint; a second one aborts."""

    def __init__(self):
        self.signal = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore(self) -> None:
        """Give the caller's handlers back (train.main may run inside a larger program)."""
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
              "(press again to abort without saving)", file=sys.stderr)

    @property
    def exit_code(self) -> int:
        return 130 if self.signal == signal.SIGINT else 143


@dataclass(frozen=True)
class Schedule:
    """When the trainer updates, saves and validates (counts are optimizer updates)."""

    max_steps: int
    grad_accum: int
    seed: int
    checkpointing_steps: int = 0  # 0 = only at the end
    validation_steps: int = 0  # 0 = only at the end
    checkpoints_total_limit: int | None = None
    skip_nan_steps: bool = False


class Trainer:
    """Runs updates with a compiled `TrainStep`; rank 0 writes metrics, checkpoints and validation images.

    `validate(epoch, step)` renders validation images (None: no validation); `run_config` goes into
    every checkpoint so a resume can check it continues the same run.
    """

    def __init__(self, stepper, unet, optimizer, batches, world: World, schedule: Schedule, ckpt_root: Path,
                 run_config: dict, metrics=None, validate: Callable[[int, int], None] | None = None,
                 progress: bool = True, say=print):
        self.stepper, self.unet, self.optimizer, self.batches = stepper, unet, optimizer, batches
        self.world, self.s, self.ckpt_root, self.run_config = world, schedule, ckpt_root, run_config
        self.metrics, self.validate_fn, self.progress, self.say = metrics, validate, progress, say
        self.last_saved = 0
        self.skipped_nan = 0

    def update(self, step: int) -> tuple[float, object, int]:
        """Accumulate the gradients of update `step`'s micro-batches: (mean loss, gradient sum, epoch)."""
        acc = self.stepper.zero_grads()
        losses = []
        for k in range(self.s.grad_accum):
            c = step * self.s.grad_accum + k
            epoch, mean, std, ctx = self.batches(c)
            update, positions = self.batches.positions(c)  # update == step: the plan has our accumulation
            keys = mx.array(sample_keys(self.s.seed, update, positions))
            loss, acc = self.stepper.grad_step(mean, std, ctx, keys, acc)
            mx.eval(loss, acc)
            losses.append(loss.item())
        return float(np.mean(losses)), acc, epoch

    def epoch_at(self, step: int) -> int:
        """The epoch of the last micro-batch that update `step` (counted from 1) trained on."""
        return self.batches.plan.epoch_of(max(step * self.s.grad_accum - 1, 0))

    def checkpoint(self, step: int) -> Path | None:
        self.last_saved = step
        if not self.world.main:
            return None
        state = {"step": step, "epoch": self.epoch_at(step), "micro_batch": step * self.s.grad_accum,
                 "next_lr": self.stepper.lr(), "config": self.run_config}
        path = save_checkpoint(self.ckpt_root, step, self.unet, self.optimizer, state, self.s.checkpoints_total_limit,
                               self.stepper.text_encoder, self.stepper.text_optimizer)
        logger.info("saved %s", path)
        return path

    def validate(self, step: int) -> None:
        if self.validate_fn is None or not self.world.main:
            return
        t = time.perf_counter()
        self.validate_fn(self.epoch_at(step), step)
        logger.info("validation at step %d in %.1fs", step, time.perf_counter() - t)

    def _stop_for_nan(self, step: int, loss: float) -> int:
        last = self.ckpt_root / f"checkpoint-{self.last_saved}" if self.last_saved else "none"
        msg = (f"step {step + 1}: loss is {loss}; stopping. The last good checkpoint is {last}; "
               "try a lower --learning_rate, or --skip_nan_steps")
        logger.error(msg, extra=FILE_ONLY)
        self.say(f"error: {msg}", file=sys.stderr)
        return 1

    def _lost_rank(self, step: int, why: str) -> int:
        if self.world.main:
            last = latest_checkpoint(self.ckpt_root)
            where = f"the last complete checkpoint is {last}" if last else "no checkpoint was written yet"
        else:
            where = "rank 0 holds the checkpoints"
        msg = (f"{why}. The whole run stops at step {step + 1}; {where}. Run the same command with "
               "--resume_from_checkpoint latest to continue")
        logger.error(msg, extra=FILE_ONLY)
        print(f"{self.world.tag}error: {msg}", file=sys.stderr)
        return 1

    def run(self, start_step: int) -> tuple[int, int | None]:
        """Train from `start_step` to `max_steps`: (the step reached, an exit status if the run must stop)."""
        self.last_saved = step = start_step
        stop = StopFlag()
        bar = tqdm(total=self.s.max_steps, initial=start_step, desc="training", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        try:
            while step < self.s.max_steps:
                t0 = time.perf_counter()
                mx.reset_peak_memory()  # each record's peak is its own step's (not encoding's, not validation's)
                loss, acc, epoch = self.update(step)
                loss = self.world.mean(loss)  # the global batch's loss: every rank takes the same branch
                if math.isfinite(loss):
                    lr = self.stepper.lr()
                    norm = self.stepper.apply_update(acc)
                    mx.eval(self.stepper.trained_state(), norm)
                    step += 1
                    dt = time.perf_counter() - t0
                    if self.metrics:
                        self.metrics.write({"step": step, "epoch": epoch, "loss": loss, "lr": lr,
                                            "grad_norm": norm.item(), "s_per_step": dt,
                                            "peak_memory_gb": mx.get_peak_memory() / 1e9})
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", s_step=f"{dt:.2f}")
                elif not self.s.skip_nan_steps:
                    return step, self._stop_for_nan(step, loss)
                else:  # skipped, but the step still counts: its checkpoint, validation and stop checks run
                    self.skipped_nan += 1
                    logger.warning("step %d: non-finite loss %s, update skipped", step + 1, loss)
                    self.stepper.skip_update()
                    step += 1
                bar.update(1)
                if self.s.checkpointing_steps and step % self.s.checkpointing_steps == 0:
                    self.checkpoint(step)
                if self.s.validation_steps and step % self.s.validation_steps == 0 and step < self.s.max_steps:
                    self.validate(step)
                if self.world.any(stop.signal is not None):  # all ranks stop after the same step
                    if self.last_saved != step:
                        self.checkpoint(step)
                    self.world.barrier()  # a rank that exits before rank 0's checkpoint gets the others killed
                    return step, stop.exit_code
        except RuntimeError as e:
            why = self.world.lost(e)
            if why is None:
                raise
            return step, self._lost_rank(step, why)
        finally:
            bar.close()
            stop.restore()
        if self.last_saved != step:
            self.checkpoint(step)
        return step, None
