#!/usr/bin/env python
"""LoRA fine-tuning of Stable Diffusion 1.x in MLX (float32), end to end.

    python train.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --train_data_dir data/shoes --output_dir runs/shoes --config configs/training_config.json

The dataset's VAE latents and CLIP embeddings are computed once and cached (keyed by content);
the loop then runs only the UNet with LoRA. Outputs in --output_dir: `lora_weights/` (PEFT,
diffusers and kohya files), `checkpoints/`, `validation/`, `logs/<timestamp>/`.
Ctrl-C finishes the current step, writes a checkpoint and exits; `--resume_from_checkpoint
latest` continues the run exactly. Several Macs: start it with `mlx.launch` (README, "Several
Macs"); each rank trains on its share of every global batch and rank 0 writes the outputs.
"""

from __future__ import annotations

import mlx_sd  # noqa: F401  (first: puts a fast BLAS under MLX on Linux)

import argparse
import json
import logging
import math
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from tqdm import tqdm

from lora import DEFAULT_TARGETS, LoRAConfig, inject_lora, trainable_count
from lora.formats import adapter_from_model, export_adapter, save_fused_model
from mlx_sd import blas, device, distributed, memory
from mlx_sd.checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint, resolve_resume,
                               save_checkpoint)
from mlx_sd.data import DataError, dataset_fingerprint, epoch_order, load_or_encode, preprocess, scan
from mlx_sd.logs import MetricsLog, plot_loss, read_metrics, setup_logging
from mlx_sd.models import ModelFolder, resolve_model
from mlx_sd.schedulers import SAMPLERS, NoiseSchedule
from mlx_sd.training import LR_SCHEDULERS, LossConfig, TrainStep, make_optimizer

logger = logging.getLogger("train")
DEFAULT_STEPS = 3000


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="JSON file whose keys are flag names (without --); flags on the command line win")

    g = p.add_argument_group("model and data")
    g.add_argument("--pretrained_model_name_or_path", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                   help="converted MLX folder, diffusers folder or Hub repo id (converted once into the cache)")
    g.add_argument("--train_data_dir", help="folder with images/ and captions.json (or metadata.jsonl)")
    g.add_argument("--output_dir", default="lora-output", help="where checkpoints, validation images, logs and weights go")
    g.add_argument("--resolution", type=int, default=512, help="training resolution (square, multiple of 8)")
    g.add_argument("--center_crop", action=argparse.BooleanOptionalAction, default=True,
                   help="center crop after resizing (--no-center_crop: random crop; needs --no_cache)")
    g.add_argument("--random_flip", action="store_true", help="mirror images at random (both flips are cached)")
    g.add_argument("--strict_data", action="store_true", help="stop on any bad dataset entry instead of skipping it")
    g.add_argument("--no_cache", action="store_true", help="encode images and captions every step (the original script's way)")

    g = p.add_argument_group("training")
    g.add_argument("--train_batch_size", type=int, default=2, help="images per micro-batch")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer update")
    g.add_argument("--max_train_steps", type=int, default=None, help=f"optimizer updates (default {DEFAULT_STEPS} unless --num_train_epochs is given)")
    g.add_argument("--num_train_epochs", type=int, default=None, help="passes over the data (used when --max_train_steps is not set)")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward: less memory, ~10-40%% more time per step")
    g.add_argument("--base_dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the frozen UNet weights and activations; LoRA, optimizer and loss stay float32 "
                        "(no float16: it needs float32 GroupNorm/softmax statistics; bfloat16 is emulated on M1/M2)")
    g.add_argument("--memory_limit_gb", type=float, default=None,
                   help="memory budget for MLX's scheduler (mlx_sd.memory); default with --gradient_checkpointing "
                        "on the CPU: UNet weights + 1 GB, otherwise MLX's own; 0 = MLX's own")
    g.add_argument("--snr_gamma", type=float, default=0.0, help="min-SNR loss weighting gamma (5.0 is common; 0 = off)")
    g.add_argument("--noise_offset", type=float, default=0.0, help="noise offset (e.g. 0.05; 0 = off)")
    g.add_argument("--seed", type=int, default=42, help="seed for data order, noise, timesteps and LoRA init")

    g = p.add_argument_group("LoRA")
    g.add_argument("--lora_rank", type=int, default=8, help="LoRA rank r")
    g.add_argument("--lora_alpha", type=float, default=16.0, help="LoRA alpha (scale = alpha / r)")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="dropout on the LoRA input")
    g.add_argument("--lora_targets", nargs="+", default=list(DEFAULT_TARGETS), help="attention projections to adapt")

    g = p.add_argument_group("optimizer")
    g.add_argument("--learning_rate", type=float, default=1e-4, help="peak learning rate")
    g.add_argument("--lr_scheduler", default="cosine", choices=LR_SCHEDULERS, help="learning-rate schedule")
    g.add_argument("--lr_warmup_steps", type=int, default=500, help="linear warm-up updates")
    g.add_argument("--lr_num_cycles", type=float, default=None, help="cycles for cosine (0.5) / cosine_with_restarts (1)")
    g.add_argument("--lr_power", type=float, default=1.0, help="power of the polynomial schedule")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW decoupled weight decay")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the global gradient norm (0 = off)")

    g = p.add_argument_group("checkpoints and validation")
    g.add_argument("--checkpointing_steps", type=int, default=500, help="save a checkpoint every N updates (0 = only at the end)")
    g.add_argument("--checkpoints_total_limit", type=int, default=5, help="keep at most N checkpoints (oldest pruned)")
    g.add_argument("--resume_from_checkpoint", default=None, help="checkpoint folder, or 'latest' in --output_dir")
    g.add_argument("--skip_nan_steps", action="store_true", help="skip updates with a non-finite loss instead of stopping")
    g.add_argument("--validation_steps", type=int, default=500, help="render validation images every N updates (0 = only at the end)")
    g.add_argument("--validation_prompts", nargs="+", default=None, help="prompts, or one .txt file with a prompt per line (default: 4 product-photo prompts)")
    g.add_argument("--num_validation_images", type=int, default=4, help="images per validation prompt")
    g.add_argument("--validation_inference_steps", type=int, default=25, help="sampler steps for validation images")
    g.add_argument("--validation_sampler", default="dpm++2m", choices=SAMPLERS, help="sampler for validation images")
    g.add_argument("--validation_guidance_scale", type=float, default=7.5, help="classifier-free guidance for validation")
    g.add_argument("--no_validation", action="store_true", help="render no validation images")
    g.add_argument("--save_fused_pipeline", action="store_true", help="also write final_pipeline/: a full model folder with the LoRA fused in")

    g = p.add_argument_group("logging and modes")
    g.add_argument("--report_to", default="none", choices=["none", "tensorboard"], help="also write TensorBoard events (needs tensorboardX)")
    g.add_argument("--check", action="store_true", help="setup check: load everything, run one step, report memory and time estimates, exit")
    g.add_argument("--no_progress", action="store_true", help="no progress bars")

    argv = sys.argv[1:] if argv is None else list(argv)
    pre, _ = p.parse_known_args(argv)
    if pre.config:
        try:
            values = json.loads(Path(pre.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            p.error(f"--config {pre.config}: {e}")
        known = {a.dest for a in p._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            p.error(f"--config {pre.config}: unknown keys {unknown} (keys are flag names without --)")
        p.set_defaults(**values)
    args = p.parse_args(argv)
    if not args.train_data_dir:
        p.error("--train_data_dir is required (a folder with images/ and captions.json)")
    if args.resolution % 8:
        p.error(f"--resolution {args.resolution} is not a multiple of 8")
    if not args.center_crop and not args.no_cache:
        p.error("random crops (--no-center_crop) change every step and cannot be cached: add --no_cache")
    return args


def validation_prompts(args) -> list[str]:
    from mlx_sd.validation import DEFAULT_PROMPTS

    vp = args.validation_prompts
    if not vp:
        return list(DEFAULT_PROMPTS)
    if len(vp) == 1 and vp[0].endswith(".txt"):
        lines = [line.strip() for line in Path(vp[0]).read_text().splitlines() if line.strip()]
        if not lines:
            raise DataError(f"{vp[0]}: no prompts in the file")
        return lines
    return vp


class StopFlag:
    """SIGINT/SIGTERM ask the loop to finish the step and checkpoint; a second one aborts."""

    def __init__(self):
        self.signal = None
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
              "(press again to abort without saving)", file=sys.stderr)


class Batches:
    """Micro-batch `c` of the run, from any position: epoch = c // per_epoch, order fixed by the seed.

    `batch` is the global micro-batch (--train_batch_size x ranks); rank r trains on its r-th slice.
    """

    def __init__(self, n: int, batch: int, seed: int, flip: bool):
        if n < batch:
            raise DataError(f"{n} usable images is fewer than one global batch of {batch} "
                            "(--train_batch_size x the number of ranks)")
        self.n, self.batch, self.seed, self.flip = n, batch, seed, flip
        self.per_epoch = n // batch  # the last partial batch of an epoch is dropped

    def __call__(self, c: int):
        epoch, j = divmod(c, self.per_epoch)
        idx = epoch_order(self.n, self.seed, epoch)[j * self.batch:(j + 1) * self.batch]
        flips = (np.random.default_rng([self.seed, epoch, j, 1]).random(self.batch) < 0.5) if self.flip \
            else np.zeros(self.batch, bool)
        return epoch, idx, flips


def main(argv=None) -> int:
    args = parse_args(argv)
    from convert.folder import ConversionError
    from lora.formats import AdapterError
    from mlx_sd.config import ConfigError
    from mlx_sd.models import ModelFolderError
    from mlx_sd.weights import WeightsError

    world = distributed.init()
    limit = memory.current_limit()  # train() may set a budget; callers in-process get theirs back
    wired = memory.set_wired_limit()  # Metal only: keep the weights resident
    try:
        return train(args, world)
    except (DataError, ModelFolderError, ConversionError, CheckpointError, AdapterError, ConfigError,
            WeightsError, distributed.DistributedError) as e:
        logger.error("%s", e)
        print(f"{world.tag}error: {e}", file=sys.stderr)
        if isinstance(e, distributed.DistributedError):  # raised on every rank at once: all report
            world.any(False)  # before any exits (mlx.launch kills the others when one exits)
        return 2
    except RuntimeError as e:  # a rank died while the others were starting up
        why = world.lost(e)
        if why is None:
            raise
        print(f"{world.tag}error: {why}; the run stops before training", file=sys.stderr)
        return 1
    finally:
        mx.set_memory_limit(limit)
        if wired is not None:
            mx.set_wired_limit(wired)


# Flags that may differ between ranks: paths (their contents are compared instead), display and
# the machine's memory budget.
LOCAL_FLAGS = ("config", "pretrained_model_name_or_path", "train_data_dir", "output_dir", "resume_from_checkpoint",
               "no_progress", "report_to", "memory_limit_gb")


def train(args, world: distributed.World) -> int:
    out = Path(args.output_dir).expanduser()
    run_logs = out / "logs" / datetime.now().strftime("%Y%m%d-%H%M%S")
    main_rank = world.main  # only rank 0 prints progress and writes logs, checkpoints and outputs
    if main_rank:
        setup_logging(run_logs)
    else:
        logging.getLogger().addHandler(logging.NullHandler())  # rank 0 logs for the run
    show = not args.no_progress and main_rank
    say = print if main_rank else (lambda *a, **k: None)
    say(f"BLAS: {blas.status().describe()}; device: {mx.default_device()}")
    say(device.one_line())

    # Data first: a bad dataset should fail before minutes of model loading.
    samples, skipped = scan(args.train_data_dir, strict=args.strict_data)
    for s in skipped:
        say(f"skipped {s}")
    say(f"dataset: {len(samples)} images ({len(skipped)} skipped) from {args.train_data_dir}")

    model_dir = resolve_model(args.pretrained_model_name_or_path)
    folder = ModelFolder(model_dir)
    schedule = NoiseSchedule(folder.scheduler_config())
    tokenizer = folder.tokenizer()
    vae_config = folder.config("vae")
    scaling = float(vae_config.get("scaling_factor", 0.18215))
    lora_cfg = LoRAConfig(r=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=tuple(args.lora_targets))
    run_config = {**vars(args), "model": str(folder.info.get("source", model_dir)), "model_dir": str(model_dir),
                  "world_size": world.size, "global_batch": args.train_batch_size * world.size}
    if main_rank:
        (run_logs / "config.json").write_text(json.dumps(run_config, indent=2) + "\n")
    if world.size > 1:  # the digests read code, dataset sizes and weight slices: only worth it with ranks
        distributed.check_same_run(world, distributed.code_digest(Path(__file__)), distributed.data_digest(samples),
                                   distributed.model_digest(folder.path),
                                   {k: v for k, v in vars(args).items() if k not in LOCAL_FLAGS})
        say(f"data parallel: {world.size} ranks; global batch {args.train_batch_size} x "
            f"{args.gradient_accumulation_steps} accumulation x {world.size} ranks = "
            f"{args.train_batch_size * args.gradient_accumulation_steps * world.size} images per update")

    batches = Batches(len(samples), args.train_batch_size * world.size, args.seed, args.random_flip)
    updates_per_epoch = max(1, batches.per_epoch // args.gradient_accumulation_steps)
    if args.max_train_steps:
        max_steps = args.max_train_steps
    elif args.num_train_epochs:
        max_steps = args.num_train_epochs * updates_per_epoch
    else:
        max_steps = DEFAULT_STEPS

    # Encode once (cached by content) or keep the encoders for per-step encoding.
    vae = text_encoder = data = None
    if args.no_cache:
        vae, text_encoder = folder.vae(), folder.text_encoder()
        encode_image = mx.compile(lambda x: vae.encode(x))
    else:
        key = dataset_fingerprint(samples, folder.path.resolve(), (folder.path / "mlx_sd.json").stat().st_mtime_ns,
                                  args.resolution, args.random_flip)
        data = load_or_encode(out / "cache", key, samples, args.resolution, args.random_flip,
                              folder.vae, folder.text_encoder, tokenizer, progress=show)
        mx.clear_cache()

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
        say(f"memory budget for MLX's scheduler: {budget:.1f} GB (--memory_limit_gb)")
    n_train = trainable_count(unet)
    n_total = sum(v.size for _, v in tree_flatten(unet.parameters()))
    say(f"LoRA r={lora_cfg.r} alpha={lora_cfg.alpha} on {', '.join(lora_cfg.targets)}: "
        f"{n_train:,} trainable of {n_total:,} UNet parameters ({100 * n_train / n_total:.4f}%)")
    optimizer = make_optimizer(args.learning_rate, args.lr_scheduler, args.lr_warmup_steps, max_steps,
                               (args.adam_beta1, args.adam_beta2), args.adam_weight_decay, args.adam_epsilon,
                               args.lr_num_cycles, args.lr_power)

    start_step = 0
    ckpt_root = out / "checkpoints"
    if args.resume_from_checkpoint and main_rank:  # the other ranks get rank 0's state below
        path = resolve_resume(args.resume_from_checkpoint, ckpt_root)
        if path is None:
            say(f"no checkpoint in {ckpt_root}; starting from step 0")
        else:
            state = load_checkpoint(path, unet, optimizer, run_config)
            start_step = state["step"]
            say(f"resumed from {path} at step {start_step}")
    start_step = distributed.share_training_state(world, unet, optimizer, start_step)
    stepper = TrainStep(unet, optimizer, schedule, LossConfig(args.snr_gamma, args.noise_offset, scaling),
                        args.gradient_accumulation_steps, args.max_grad_norm,
                        group=world.group if world.size > 1 else None)
    b, offset = args.train_batch_size, world.rank * args.train_batch_size

    def pixels(c: int) -> np.ndarray:
        """Images of micro-batch `c`, this rank's rows; a pure function of (seed, c)."""
        _, idx, flips = batches(c)
        idx, flips = idx[offset:offset + b], flips[offset:offset + b]
        # Random crops: one generator per position in the global batch, the same on any rank.
        return np.stack([preprocess(samples[i].path, args.resolution, args.center_crop, bool(f),
                                    np.random.default_rng([args.seed, c, 2, offset + j]))
                         for j, (i, f) in enumerate(zip(idx, flips))])

    loader = ThreadPoolExecutor(1, thread_name_prefix="images") if data is None else None
    prefetched = {}

    def micro_batch(c: int):
        epoch, idx, flips = batches(c)
        idx, flips = idx[offset:offset + b], flips[offset:offset + b]  # this rank's slice
        if data is not None:
            mean = np.where(flips[:, None, None, None], data.mean_flip[idx], data.mean[idx]) if args.random_flip else data.mean[idx]
            std = np.where(flips[:, None, None, None], data.std_flip[idx], data.std[idx]) if args.random_flip else data.std[idx]
            ctx = data.text[data.caption_index[idx]]
            return epoch, mx.array(mean), mx.array(std), mx.array(ctx)
        # Decoding the next micro-batch's images overlaps this one's step (PIL releases the GIL).
        px = (prefetched.pop(c, None) or loader.submit(pixels, c)).result()
        prefetched.clear()
        prefetched[c + 1] = loader.submit(pixels, c + 1)
        mean, logvar = encode_image(mx.array(px))
        ctx = text_encoder(mx.array(tokenizer([samples[i].caption for i in idx])))
        return epoch, mean, mx.exp(0.5 * logvar), ctx

    def one_update(step: int):
        """Accumulate the step's micro-batches; returns (mean loss, grads, epoch)."""
        acc = stepper.zero_grads()
        losses = []
        for k in range(args.gradient_accumulation_steps):
            c = step * args.gradient_accumulation_steps + k
            mx.random.seed(args.seed * 1_000_003 + c)  # randomness is a function of the position
            epoch, mean, std, ctx = micro_batch(c)
            loss, acc = stepper.grad_step(mean, std, ctx, acc)
            mx.eval(loss, acc)
            losses.append(loss.item())
        return float(np.mean(losses)), acc, epoch

    if args.check:
        from mlx_sd.validation import measure_peak_gb

        def validation_peak():
            return measure_peak_gb(folder, unet, tokenizer, validation_prompts(args), args.num_validation_images,
                                   args.validation_guidance_scale, args.resolution, args.validation_sampler)
        return setup_check(args, stepper, one_update, unet, n_train, max_steps, say,
                           None if args.no_validation else validation_peak)

    prompts = validation_prompts(args)
    metrics = MetricsLog(run_logs, args.report_to) if main_rank else None
    stop = StopFlag()
    last_saved = start_step
    epoch = start_step * args.gradient_accumulation_steps // batches.per_epoch
    skipped_nan = 0

    def checkpoint(step):
        nonlocal last_saved
        last_saved = step
        if not main_rank:
            return None
        state = {"step": step, "epoch": epoch, "micro_batch": step * args.gradient_accumulation_steps,
                 "next_lr": stepper.lr(), "config": run_config}
        path = save_checkpoint(ckpt_root, step, unet, optimizer, state, args.checkpoints_total_limit)
        logger.info("saved %s", path)
        return path

    def validate(step):
        if args.no_validation or not prompts or not main_rank:
            return
        from mlx_sd.validation import run_validation

        t = time.perf_counter()
        files = run_validation(folder, unet, tokenizer, prompts, out / "validation", epoch, step,
                               args.num_validation_images, args.validation_inference_steps,
                               args.validation_sampler, args.validation_guidance_scale, args.seed,
                               args.resolution, progress=show)
        logger.info("validation at step %d: %d images in %.1fs", step, len(files), time.perf_counter() - t)

    bar = tqdm(total=max_steps, initial=start_step, desc="training", unit="step", disable=not show, dynamic_ncols=True)
    step = start_step
    status = 0
    try:
        while step < max_steps:
            t0 = time.perf_counter()
            loss, acc, epoch = one_update(step)
            loss = world.mean(loss)  # the global batch's loss: every rank takes the same branch
            if not math.isfinite(loss):
                if args.skip_nan_steps:
                    skipped_nan += 1
                    logger.warning("step %d: non-finite loss %s, update skipped", step + 1, loss)
                    # The step still counts, so the LR schedule stays aligned with the step number.
                    optimizer.state["step"] = optimizer.step + 1
                    step += 1
                    bar.update(1)
                    continue
                msg = (f"step {step + 1}: loss is {loss}; stopping. The last good checkpoint is "
                       f"{ckpt_root / f'checkpoint-{last_saved}' if last_saved else 'none'}; "
                       "try a lower --learning_rate, or --skip_nan_steps")
                logger.error(msg)
                say(f"error: {msg}", file=sys.stderr)
                status = 1
                break
            lr = stepper.lr()
            norm = stepper.apply_update(acc)
            mx.eval(unet.trainable_parameters(), optimizer.state, norm)
            step += 1
            dt = time.perf_counter() - t0
            if metrics:
                metrics.write({"step": step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": norm.item(),
                               "s_per_step": dt, "peak_memory_gb": mx.get_peak_memory() / 1e9})
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", s_step=f"{dt:.2f}")
            bar.update(1)
            if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                checkpoint(step)
            if args.validation_steps and step % args.validation_steps == 0 and step < max_steps:
                validate(step)
            if world.any(stop.signal is not None):  # all ranks stop after the same step
                if last_saved != step:
                    checkpoint(step)
                world.any(False)  # wait for rank 0's checkpoint: a rank that exits first gets the others killed
                say(f"stopped at step {step}; resume with --resume_from_checkpoint latest "
                    f"--output_dir {out}", file=sys.stderr)
                return 130 if stop.signal == signal.SIGINT else 143
    except RuntimeError as e:
        why = world.lost(e)
        if why is None:
            raise
        last = latest_checkpoint(ckpt_root) if main_rank else None
        where = (f"the last complete checkpoint is {last}" if last else "no checkpoint was written yet") \
            if main_rank else "rank 0 holds the checkpoints"
        msg = (f"{why}. The whole run stops at step {step + 1}; {where}. Run the same command with "
               "--resume_from_checkpoint latest to continue")
        logger.error(msg)
        print(f"{world.tag}error: {msg}", file=sys.stderr)
        return 1
    finally:
        bar.close()
        if metrics:
            metrics.close()
        if loader:
            loader.shutdown(wait=False, cancel_futures=True)

    if status:
        return status
    if last_saved != step:
        checkpoint(step)
    if not main_rank:
        return 0
    meta = {"steps": step, "base_model": run_config["model"], "dropout": args.lora_dropout, "init": "gaussian",
            "rank": args.lora_rank, "alpha": args.lora_alpha, "resolution": args.resolution}
    written = export_adapter(adapter_from_model(unet, meta), out / "lora_weights")
    validate(step)
    curve = plot_loss(read_metrics(run_logs / "metrics.jsonl"), run_logs / "loss_curve.png")
    if args.save_fused_pipeline:
        say(f"fused model: {save_fused_model(folder.path, unet, out / 'final_pipeline')}")
    if skipped_nan:
        say(f"{skipped_nan} update(s) skipped for non-finite loss")
    say(f"done: {step} steps. LoRA weights: {', '.join(str(p) for p in written.values())}")
    say(f"logs: {run_logs}" + (f" (loss curve {curve.name})" if curve else ""))
    return 0


def setup_check(args, stepper, one_update, unet, n_train, max_steps, say=print, validation_peak=None) -> int:
    """One forward+backward on a real batch; report loss, memory and time estimates."""
    mx.reset_peak_memory()
    timings = []
    for i in range(2):  # the first step includes compilation
        t = time.perf_counter()
        loss, acc, _ = one_update(i)
        timings.append(time.perf_counter() - t)
        if not math.isfinite(loss):
            say(f"check FAILED: loss is {loss} on the first batch")
            return 1
    per_step = timings[-1]
    say(f"trainable parameters: {n_train:,}")
    say(f"loss on the first batches: {loss:.5f} (finite)")
    say(f"BLAS: {blas.status().describe()}; device: {mx.default_device()}")
    train_peak = mx.get_peak_memory() / 1e9
    say(f"peak memory (MLX): {train_peak:.2f} GB")
    say(f"time per update: {per_step:.2f} s (first, with compilation: {timings[0]:.2f} s)")
    say(f"estimated run: {max_steps} updates ~ {per_step * max_steps / 3600:.2f} h plus validations")
    fits, lines = memory.fit_report(train_peak, validation_peak() if validation_peak else None, memory.machine_memory(),
                                    batch=args.train_batch_size, checkpointing=args.gradient_checkpointing,
                                    base_dtype=args.base_dtype)
    for line in lines:
        say(line)
    if not fits:
        say("check FAILED: the run does not fit this machine's memory (see above)")
        return 1
    say("check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
