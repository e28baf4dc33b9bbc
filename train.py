#!/usr/bin/env python
"""LoRA fine-tuning of Stable Diffusion 1.x in MLX (float32), end to end.

    python train.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --train_data_dir data/shoes --output_dir runs/shoes --config configs/training_config.json

The dataset's VAE latents and CLIP embeddings are computed once and cached (keyed by content);
the loop then runs only the UNet with LoRA (and, with --train_text_encoder, the text encoder with
LoRA: then only the latents are cached). Outputs in --output_dir: `lora_weights/` (PEFT,
diffusers and kohya files), `checkpoints/`, `validation/`, `logs/<timestamp>/`.
Ctrl-C finishes the current step, writes a checkpoint and exits; `--resume_from_checkpoint
latest` continues the run exactly. Several Macs: start it with `mlx.launch` (README, "Several
Macs"); each rank trains on its share of every global batch and rank 0 writes the outputs.
"""

from __future__ import annotations

import mlx_sd  # noqa: F401, I001  (first: puts a fast BLAS under MLX on Linux)

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from convert.model import resolve_model
from lora import LoRAConfig, inject_lora, text_encoder_predicate, trainable_count
from lora.export import export_adapter, save_fused_model
from lora.formats import adapter_from_model
from mlx_sd import blas, device, distributed, memory
from mlx_sd.buckets import BucketPlan, Buckets
from mlx_sd.captions import CaptionVariants
from mlx_sd.checkpoint import CheckpointError, latest_checkpoint, length_change, load_checkpoint, resolve_resume
from mlx_sd.config import ConfigError
from mlx_sd.data import BatchPlan, dataset_fingerprint, load_or_encode, scan
from mlx_sd.errors import MlxSdError
from mlx_sd.heldout import heldout_loss, split_holdout
from mlx_sd.io import WriteError, write_text
from mlx_sd.logs import FILE_ONLY, MetricsLog, plot_loss, run_history
from mlx_sd.model_card import write_model_card
from mlx_sd.model_folder import MARKER, ModelFolder
from mlx_sd.run import Run, open_run, stop_on_signal
from mlx_sd.schedulers import NoiseSchedule
from mlx_sd.sources import fetch_hub_dataset, subset
from mlx_sd.train_options import DEFAULT_STEPS, LOCAL_FLAGS, parse_args, validation_prompts
from mlx_sd.trainer import CachedBatches, EncodingBatches, Schedule, Trainer
from mlx_sd.training import LossConfig, ScheduledAdamW, TrainStep, lr_factor, make_optimizer, text_embeddings

logger = logging.getLogger("train")
logger.addHandler(logging.NullHandler())  # before logs/ exists, errors are printed, not logged twice


def main(argv=None) -> int:
    args = parse_args(argv)
    world = distributed.init()
    limit = memory.current_limit()  # train() may set a budget; callers in-process get theirs back
    wired = memory.set_wired_limit()  # Metal only: keep the weights resident
    run = None
    try:
        run = open_run(args.output_dir, main=world.main, resume=args.resume_from_checkpoint,
                       overwrite=args.overwrite, reuse=args.check, progress=not args.no_progress)
        return train(args, world, run)
    except MlxSdError as e:
        logger.error("%s", e, extra=FILE_ONLY)
        print(f"{world.tag}error: {e}", file=sys.stderr)
        if isinstance(e, distributed.DistributedError):  # raised on every rank at once: all report
            world.barrier()  # before any exits (mlx.launch kills the others when one exits)
        return getattr(e, "exit_code", 2)
    except RuntimeError as e:  # a rank died while the others were starting up
        why = world.lost(e)
        if why is None:
            raise
        print(f"{world.tag}error: {why}; the run stops before training", file=sys.stderr)
        return 1
    finally:
        if run is not None:
            run.close()
        mx.set_memory_limit(limit)
        if wired is not None:
            mx.set_wired_limit(wired)




@dataclass
class Inputs:
    samples: list
    folder: ModelFolder
    schedule: NoiseSchedule
    tokenizer: object
    scaling: float  # the VAE's latent scaling factor
    held: list = field(default_factory=list)  # held-out samples for val_loss, never in a training batch


def load_inputs(args, run: Run) -> Inputs:
    """The dataset first (a bad one fails before minutes of model loading), then the model folder."""
    data_dir = args.train_data_dir or fetch_hub_dataset(args.dataset_name, args.dataset_revision,
                                                        args.caption_extension)
    samples, skipped = scan(data_dir, args.strict_data, args.caption_extension, args.image_column,
                            args.caption_column)
    for s in skipped:
        run.say(f"skipped {s}")
    source = f"{args.dataset_name} ({data_dir})" if args.dataset_name else data_dir
    run.say(f"dataset: {len(samples)} images ({len(skipped)} skipped) from {source}")
    held = []
    if args.validation_data_dir:
        held, _ = scan(args.validation_data_dir, args.strict_data, args.caption_extension, args.image_column,
                       args.caption_column)
    elif args.validation_split:
        try:
            keep, out = split_holdout([s.path.name for s in samples], args.validation_split, args.seed)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        samples, held = [samples[i] for i in keep], [samples[i] for i in out]
    if args.max_train_samples and args.max_train_samples < len(samples):
        samples = subset(samples, args.max_train_samples, args.seed)
        run.say(f"--max_train_samples: training on {len(samples)} of them")
    if held:
        run.say(f"held out for val_loss: {len(held)} images; training on {len(samples)}")
    folder = ModelFolder(resolve_model(args.pretrained_model_name_or_path))
    check_resolution(args.resolution, folder)
    for flag in ("validation_width", "validation_height") + (("bucket_reso_steps",) if args.enable_bucket else ()):
        if getattr(args, flag) is not None:
            check_resolution(getattr(args, flag), folder, flag)
    scaling = float(folder.config("vae").get("scaling_factor", 0.18215))
    return Inputs(samples, folder, NoiseSchedule(folder.scheduler_config()), folder.tokenizer(), scaling, held)


def check_resolution(resolution: int, folder: ModelFolder, flag: str = "resolution") -> None:
    """The VAE's and the UNet's downsamplings must divide the size evenly; say which sizes work."""
    vae = 2 ** (len(folder.config("vae").get("block_out_channels", [0] * 4)) - 1)
    unet = 2 ** (len(folder.config("unet").get("block_out_channels", [0] * 4)) - 1)
    if resolution % (vae * unet):
        m = vae * unet
        lower, upper = max(m, resolution // m * m), (resolution // m + 1) * m
        raise ConfigError(f"--{flag} {resolution}: this model needs a multiple of {m} (the VAE divides by "
                          f"{vae}, the UNet by {unet} more); e.g. {lower} or {upper}")


def check_ranks(args, world, run: Run, inputs: Inputs) -> None:
    """With several ranks: the same code, data, model and settings everywhere, or nothing trains."""
    if world.size == 1:  # the digests read code, dataset sizes and weight slices: only worth it with ranks
        return
    distributed.check_same_run(world, distributed.code_digest(Path(__file__)),
                               distributed.data_digest(inputs.samples), distributed.model_digest(inputs.folder.path),
                               {k: v for k, v in vars(args).items() if k not in LOCAL_FLAGS})
    run.say(f"data parallel: {world.size} ranks; global batch {args.train_batch_size} x "
            f"{args.gradient_accumulation_steps} accumulation x {world.size} ranks = "
            f"{args.train_batch_size * args.gradient_accumulation_steps * world.size} images per update")


def total_steps(args, plan: BatchPlan) -> int:
    if args.max_train_steps:
        return args.max_train_steps
    if args.num_train_epochs:
        return args.num_train_epochs * max(1, plan.epoch_samples // (plan.batch * plan.accum))
    return DEFAULT_STEPS


def batch_plan(args, world, run: Run, inputs: Inputs) -> tuple[BatchPlan | BucketPlan, Buckets | None]:
    """Which samples each global micro-batch holds; with --enable_bucket, one aspect-ratio bucket per device batch."""
    batch, accum = args.train_batch_size * world.size, args.gradient_accumulation_steps
    if not args.enable_bucket:
        return BatchPlan(len(inputs.samples), batch, args.seed, args.random_flip, accum), None
    buckets = Buckets.of_files([s.path for s in inputs.samples], args.resolution, args.min_bucket_reso,
                               args.max_bucket_reso, args.bucket_reso_steps)
    for line in buckets.describe(args.train_batch_size):
        run.say(line)
    return BucketPlan(buckets.of, batch, args.seed, args.random_flip, accum, args.train_batch_size), buckets


def micro_batches(args, rank: int, run: Run, inputs: Inputs, plan: BatchPlan, buckets: Buckets | None = None):
    """Encode the dataset once (cached by content), or keep the encoders for per-step encoding."""
    folder = inputs.folder
    b = args.train_batch_size
    rows = slice(rank * b, (rank + 1) * b)  # this rank's slice of each global batch
    text = args.train_text_encoder  # batches then bring token ids, which the train step embeds
    variants = CaptionVariants(args.caption_dropout_rate, args.shuffle_caption, args.keep_tokens,
                               args.caption_separator)
    variants.check([s.caption for s in inputs.samples])
    if args.no_cache:
        return EncodingBatches(plan, rows, inputs.samples, args.resolution, args.center_crop,
                               folder.vae(), None if text else folder.text_encoder(), inputs.tokenizer, variants,
                               sizes=buckets.sizes() if buckets else None)
    bucket_key = (args.min_bucket_reso, args.max_bucket_reso, args.bucket_reso_steps) if buckets else ()
    key = dataset_fingerprint(inputs.samples, folder.path.resolve(), (folder.path / MARKER).stat().st_mtime_ns,
                              args.resolution, args.random_flip, *bucket_key)
    with stop_on_signal("encoding the dataset", "nothing was cached yet; the next run encodes it again"):
        data = load_or_encode(run.out / "cache", key, inputs.samples, args.resolution, args.random_flip,
                              folder.vae, None if text else folder.text_encoder, inputs.tokenizer,
                              progress=run.progress, buckets=buckets.arrays() if buckets else None)
    mx.clear_cache()
    if variants.active:
        run.say(f"caption variants: dropout {variants.dropout:g}" + (
            f", tags shuffled (first {variants.keep_tokens} kept); text encoded every step" if variants.shuffle or text
            else ", the empty caption's embedding computed once"))
    return CachedBatches(plan, rows, data, [s.caption for s in inputs.samples], variants,
                         folder.text_encoder() if variants.active and not text else None, inputs.tokenizer,
                         token_ids=text)


def build_unet(args, run: Run, folder: ModelFolder, lora_cfg: LoRAConfig):
    """The frozen UNet with LoRA injected (seeded init), and the memory budget that fits it."""
    mx.random.seed(args.seed)  # LoRA init
    unet = folder.unet()
    unet.gradient_checkpointing = args.gradient_checkpointing
    if args.base_dtype != "float32":
        unet.set_dtype(getattr(mx, args.base_dtype))  # before injection: adapters are created float32
    inject_lora(unet, lora_cfg)
    budget = args.memory_limit_gb if args.memory_limit_gb is not None else \
        memory.auto_budget_gb(unet, args.gradient_checkpointing)
    memory.set_budget(budget)
    if budget:
        run.say(f"memory budget for MLX's scheduler: {budget:.1f} GB (--memory_limit_gb)")
    n_train = trainable_count(unet)
    n_total = sum(v.size for _, v in tree_flatten(unet.parameters()))
    run.say(f"LoRA r={lora_cfg.r} alpha={lora_cfg.alpha} on {', '.join(lora_cfg.targets)}: "
            f"{n_train:,} trainable of {n_total:,} UNet parameters ({100 * n_train / n_total:.4f}%)")
    return unet


def build_text_encoder(args, run: Run, folder: ModelFolder, lora_cfg: LoRAConfig):
    """The text encoder with LoRA injected (--train_text_encoder; float32), or None: embeddings are cached."""
    if not args.train_text_encoder:
        return None
    te = folder.text_encoder()
    cfg = replace(lora_cfg, targets=tuple(args.text_encoder_targets))
    inject_lora(te, cfg, text_encoder_predicate(cfg.targets))
    if args.memory_limit_gb is None and memory.auto_budget_gb(te, args.gradient_checkpointing):
        memory.set_budget(memory.current_limit() / 1e9 + memory.weights_gb(te))  # the automatic one is the UNet's
    n_train = trainable_count(te)
    n_total = sum(v.size for _, v in tree_flatten(te.parameters()))
    run.say(f"text-encoder LoRA r={cfg.r} alpha={cfg.alpha} on {', '.join(cfg.targets)}: "
            f"{n_train:,} trainable of {n_total:,} text-encoder parameters ({100 * n_train / n_total:.4f}%)")
    return te


def restore(world, run: Run, resume: Path | None, unet, optimizer, run_config: dict, text_encoder=None,
            text_optimizer=None, max_steps: int | None = None) -> int:
    """The step to start from: 0, or checkpoint `resume`'s (rank 0 reads it; every rank gets its state)."""
    start_step = 0
    if resume is not None and run.main:
        state = load_checkpoint(resume, unet, optimizer, run_config, text_encoder, text_optimizer)
        start_step = state["step"]
        run.say(f"resumed from {resume} at step {start_step}")
        if changed := length_change(state, run_config):
            say_length_change(run, resume, state, changed, start_step, max_steps, optimizer)
    if text_encoder is not None:
        distributed.share_training_state(world, text_encoder, text_optimizer, start_step)
    return distributed.share_training_state(world, unet, optimizer, start_step)


def say_length_change(run: Run, resume: Path, state: dict, changed: dict, step: int, max_steps: int | None,
                      optimizer) -> None:
    """A resume with another run length: refuse going back, else say what the longer run does differently."""
    what = ", ".join(f"--{k} {new} (checkpoint: {old})" for k, (old, new) in changed.items())
    if max_steps is not None and step > max_steps:
        raise CheckpointError(f"{resume} is at step {step}, past the {max_steps} steps of {what}. Give at least "
                              f"{step} steps, or resume from an earlier checkpoint in {resume.parent}.")
    saved = state.get("config", {})
    line = f"run length changed: {what}; training continues to step {max_steps}."
    old_total, lr = saved.get("max_train_steps"), saved.get("learning_rate")
    if isinstance(optimizer, ScheduledAdamW) and old_total and lr:
        steps = mx.arange(step + 1)
        old = lr * lr_factor(saved.get("lr_scheduler", "constant"), saved.get("lr_warmup_steps", 0), old_total,
                             saved.get("lr_num_cycles"), saved.get("lr_power", 1.0), lr_end_ratio=1e-7 / lr)(steps)
        same = bool(mx.allclose(old, optimizer.schedule(steps), rtol=1e-6, atol=0.0))
        if same:
            line += (f" The LR schedule ({saved.get('lr_scheduler')}) is the same for both lengths up to here, so "
                     "the run continues as a straight run of the new length would.")
        else:
            line += (" The LR schedule is recomputed for the new length, as diffusers' and kohya's scripts do: "
                     f"at step {step} the LR is {optimizer.lr_at(step):.3g} (the old schedule's: "
                     f"{float(old[-1]):.3g}). The result differs from a straight run of the new length, whose "
                     f"first {step} steps would have followed the new schedule too.")
    run.say(line)


def heldout_scorer(args, run: Run, inputs: Inputs, unet, text_encoder=None):
    """`score()` -> the held-out loss of the current adapter (mlx_sd.heldout), or None without held-out images."""
    if not inputs.held or not run.main:
        return None
    folder = inputs.folder
    key = dataset_fingerprint(inputs.held, folder.path.resolve(), (folder.path / MARKER).stat().st_mtime_ns,
                              args.resolution, False)
    data = load_or_encode(run.out / "cache", f"heldout-{key}", inputs.held, args.resolution, False, folder.vae,
                          None if text_encoder else folder.text_encoder, inputs.tokenizer, progress=run.progress)
    latents = data.mean * inputs.scaling  # posterior mean: no sampling
    if text_encoder is not None:  # the embeddings of the text encoder as trained so far
        ids = inputs.tokenizer([s.caption for s in inputs.held])
        return lambda: heldout_loss(unet, inputs.schedule, latents, np.array(text_embeddings(text_encoder, ids)),
                                    seed=args.seed)
    ctx = data.text[data.caption_index]
    return lambda: heldout_loss(unet, inputs.schedule, latents, ctx, seed=args.seed)


def validator(args, run: Run, inputs: Inputs, unet, metrics=None, text_encoder=None):
    """`validate(epoch, step)`: val_loss on the held-out images and the validation prompts rendered, or None."""
    prompts = validation_prompts(args)
    score = heldout_scorer(args, run, inputs, unet, text_encoder)
    render = not args.no_validation and bool(prompts)
    if not render and score is None:
        return None
    from mlx_sd.validation import run_validation

    def validate(epoch: int, step: int) -> None:
        if score is not None:
            val = score()
            run.say(f"step {step}: val_loss {val:.6f} ({len(inputs.held)} held-out images)")
            if metrics is not None:
                metrics.write({"step": step, "epoch": epoch, "val_loss": val})
        if render:
            run_validation(inputs.folder, unet, inputs.tokenizer, prompts, run.out / "validation", epoch, step,
                           args.num_validation_images, args.validation_inference_steps, args.validation_sampler,
                           args.validation_guidance_scale, args.seed, args.resolution, progress=run.progress,
                           dtype=args.validation_dtype, text_encoder=text_encoder, width=args.validation_width,
                           height=args.validation_height)

    return validate


def finish(args, run: Run, trainer: Trainer, unet, inputs: Inputs, run_config: dict, step: int) -> int:
    """Export the adapter, render the last validation, plot the loss, and say where everything is."""
    meta = {"steps": step, "base_model": run_config["model"], "dropout": args.lora_dropout, "init": "gaussian",
            "rank": args.lora_rank, "alpha": args.lora_alpha, "resolution": args.resolution}
    text_encoder = trainer.stepper.text_encoder
    if text_encoder is not None:
        meta.update(learning_rate=args.learning_rate, text_encoder_lr=args.text_encoder_lr or args.learning_rate)
    written = export_adapter(adapter_from_model(unet, meta, text_encoder), run.out / "lora_weights")
    trainer.validate(step)
    grids = sorted((run.out / "validation").glob(f"*_step{step:04d}_grid.png"))
    card = write_model_card(run.out / "lora_weights", run_config, step, [s.caption for s in inputs.samples],
                            [] if args.no_validation else validation_prompts(args), grids[-1] if grids else None,
                            written)
    curve = plot_loss(run_history(run.logs.parent), run.logs / "loss_curve.png")
    if args.save_fused_pipeline:
        run.say(f"fused model: {save_fused_model(inputs.folder.path, unet, run.out / 'final_pipeline', text_encoder)}")
    if trainer.skipped_nan:
        run.say(f"{trainer.skipped_nan} update(s) skipped for non-finite loss")
    run.say(f"done: {step} steps. LoRA weights: {', '.join(str(p) for p in written.values())}; model card {card}")
    run.say(f"logs: {run.logs}" + (f" (loss curve {curve.name})" if curve else ""))
    return 0


def train(args, world: distributed.World, run: Run) -> int:
    run.say(f"BLAS: {blas.status().describe()}; device: {mx.default_device()}")
    run.say(device.one_line())
    ckpt_root = run.out / "checkpoints"
    resume = resolve_resume(args.resume_from_checkpoint, ckpt_root, warn=run.say) \
        if args.resume_from_checkpoint and run.main else None  # a typo fails here, before any work
    if args.resume_from_checkpoint == "latest" and resume is None and run.main:
        run.say(f"no checkpoint in {ckpt_root}; starting from step 0")
    inputs = load_inputs(args, run)
    lora_cfg = LoRAConfig(r=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                          targets=tuple(args.lora_targets))
    run_config = {**vars(args), "model": str(inputs.folder.info.get("source", inputs.folder.path)),
                  "model_dir": str(inputs.folder.path), "world_size": world.size,
                  # What a resume must keep (mlx_sd.checkpoint): the images per update, and with buckets
                  # the per-device batch, which groups them (mlx_sd.buckets).
                  "global_batch": args.train_batch_size * world.size * args.gradient_accumulation_steps,
                  "bucket_batch": args.train_batch_size if args.enable_bucket else None,
                  "data": distributed.data_digest(inputs.samples).hex()}
    if run.main:
        write_text(run.logs / "config.json", json.dumps(run_config, indent=2) + "\n")
    check_ranks(args, world, run, inputs)

    plan, buckets = batch_plan(args, world, run, inputs)
    max_steps = total_steps(args, plan)
    batches = micro_batches(args, world.rank, run, inputs, plan, buckets)
    unet = build_unet(args, run, inputs.folder, lora_cfg)
    text_encoder = build_text_encoder(args, run, inputs.folder, lora_cfg)

    def adamw(lr: float):  # every adapter on the same schedule, each at its own peak LR
        return make_optimizer(lr, args.lr_scheduler, args.lr_warmup_steps, max_steps,
                              (args.adam_beta1, args.adam_beta2), args.adam_weight_decay, args.adam_epsilon,
                              args.lr_num_cycles, args.lr_power)
    optimizer = adamw(args.learning_rate)
    text_optimizer = adamw(args.text_encoder_lr or args.learning_rate) if text_encoder is not None else None
    start_step = restore(world, run, resume, unet, optimizer, run_config, text_encoder, text_optimizer,
                         max_steps)
    stepper = TrainStep(unet, optimizer, inputs.schedule, LossConfig(args.snr_gamma, args.noise_offset, inputs.scaling),
                        args.gradient_accumulation_steps, args.max_grad_norm,
                        group=world.group if world.size > 1 else None, text_encoder=text_encoder,
                        text_optimizer=text_optimizer)
    schedule = Schedule(max_steps, args.gradient_accumulation_steps, args.seed, args.checkpointing_steps,
                        args.validation_steps, args.checkpoints_total_limit, args.skip_nan_steps)
    metrics = MetricsLog(run.logs, args.report_to) if run.main and not args.check else None
    trainer = Trainer(stepper, unet, optimizer, batches, world, schedule, ckpt_root, run_config, metrics,
                      validator(args, run, inputs, unet, metrics, text_encoder), progress=run.progress, say=run.say)
    run.started = True
    try:
        if args.check:
            from mlx_sd.validation import measure_peak_gb

            def validation_peak():
                return measure_peak_gb(inputs.folder, unet, inputs.tokenizer, validation_prompts(args),
                                       args.num_validation_images, args.validation_guidance_scale, args.resolution,
                                       args.validation_sampler, args.validation_width, args.validation_height,
                                       args.validation_dtype, text_encoder)
            return setup_check(trainer, unet, max_steps, run.say, args, None if args.no_validation else validation_peak)
        step, status = trainer.run(start_step)
        if status is None and run.main:
            status = finish(args, run, trainer, unet, inputs, run_config, step)
    except WriteError as e:
        last = latest_checkpoint(ckpt_root)
        raise WriteError(f"{e}\nTraining stopped; " + (f"the last complete checkpoint is {last}: add "
                         "--resume_from_checkpoint latest to continue." if last else "no checkpoint was written yet."))
    finally:
        batches.close()
        if metrics:
            metrics.close()
    if status in (130, 143):
        run.say(f"stopped at step {step}; resume with --resume_from_checkpoint latest --output_dir {run.out}",
                file=sys.stderr)
    return status or 0


def setup_check(trainer: Trainer, unet, max_steps: int, say=print, args=None, validation_peak=None) -> int:
    """One forward+backward on a real batch; report loss, memory (against the machine's) and time estimates."""
    mx.reset_peak_memory()
    timings = []
    for i in range(2):  # the first step includes compilation
        t = time.perf_counter()
        loss, acc, _ = trainer.update(i)  # every micro-batch of update i, then the optimizer update itself
        if math.isfinite(loss):
            norm = trainer.stepper.apply_update(acc)
            mx.eval(trainer.stepper.trained_state(), norm)
        timings.append(time.perf_counter() - t)
        if not math.isfinite(loss):
            say(f"check FAILED: loss is {loss} on the first batch")
            return 1
    per_step = timings[-1]
    say(f"trainable parameters: {trainable_count(unet):,}")
    say(f"loss on the first batches: {loss:.5f} (finite)")
    say(f"BLAS: {blas.status().describe()}; device: {mx.default_device()}")
    train_peak = mx.get_peak_memory() / 1e9
    say(f"peak memory (MLX): {train_peak:.2f} GB")
    say(f"time per update: {per_step:.2f} s (first, with compilation: {timings[0]:.2f} s)")
    say(f"estimated run: {max_steps} updates ~ {per_step * max_steps / 3600:.2f} h plus validations")
    if args is not None:
        fits, lines = memory.fit_report(train_peak, validation_peak() if validation_peak else None,
                                        memory.machine_memory(), batch=args.train_batch_size,
                                        checkpointing=args.gradient_checkpointing, base_dtype=args.base_dtype)
        for line in lines:
            say(line)
        if not fits:
            say("check FAILED: the run does not fit this machine's memory (see above)")
            return 1
    say("check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
