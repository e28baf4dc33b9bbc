"""train.py's command line: every flag, its checks, and `--config` files of flag values.

`parse_args(argv)` returns the argparse namespace train.py runs from; a `--config` JSON object
gives defaults (keys are flag names without --) that the command line overrides, checked with the
same types and choices as the flags themselves.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lora import DEFAULT_TARGETS, TEXT_ENCODER_ALLOWED, TEXT_ENCODER_TARGETS
from .cli import HelpFormatter, number
from .data import DataError
from .schedulers import SAMPLERS
from .training import LR_SCHEDULERS

DESCRIPTION = "LoRA fine-tuning of Stable Diffusion 1.x in MLX (float32), end to end."
DEFAULT_STEPS = 3000

# Flags that may differ between ranks: paths (their contents are compared instead), display and
# the machine's memory budget.
LOCAL_FLAGS = ("config", "pretrained_model_name_or_path", "train_data_dir", "output_dir", "resume_from_checkpoint",
               "no_progress", "report_to", "memory_limit_gb")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=HelpFormatter,
                                usage="%(prog)s (--train_data_dir DIR | --dataset_name USER/REPO) "
                                      "[--output_dir DIR] [options] (see --help)")
    p.add_argument("--config", help="JSON file whose keys are flag names (without --); flags on the command line win")

    g = p.add_argument_group("model and data")
    g.add_argument("--pretrained_model_name_or_path", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                   help="converted MLX folder, diffusers folder or Hub repo id (converted once into the cache)")
    g.add_argument("--train_data_dir",
                   help="dataset folder: images with captions.json, metadata.jsonl or a caption file beside each image")
    g.add_argument("--dataset_name", metavar="USER/REPO",
                   help="a Hugging Face Hub dataset repo (imagefolder) instead of --train_data_dir; cached after the "
                        "first download")
    g.add_argument("--dataset_revision", default=None, help="branch, tag or commit of --dataset_name")
    g.add_argument("--image_column", default=None,
                   help="metadata key of the image file (default: file_name, image, file, ...; an imagefolder's "
                        "'image' column is its file_name)")
    g.add_argument("--caption_column", default=None,
                   help="metadata key of the caption (default: text, caption, prompt)")
    g.add_argument("--caption_extension", default=None, metavar="EXT",
                   help="read captions from a file beside each image with this extension (kohya: .txt, .caption); "
                        "default: captions.json / metadata.jsonl, else .txt or .caption files")
    g.add_argument("--caption_dropout_rate", type=number(float, min=0, max=1, max_open=True), default=0.0,
                   help="probability of training a step's image with the empty caption (the unconditional branch "
                        "guidance uses; e.g. 0.05)")
    g.add_argument("--shuffle_caption", action="store_true",
                   help="shuffle each caption's comma-separated tags every step")
    g.add_argument("--keep_tokens", type=number(int, min=0), default=0,
                   help="with --shuffle_caption: the first N tags stay in place (e.g. a trigger word)")
    g.add_argument("--caption_separator", default=",", help="what separates tags for --shuffle_caption")
    g.add_argument("--max_train_samples", type=number(int, min=1), default=None,
                   help="train on this many images, chosen by --seed (quick experiments)")
    g.add_argument("--output_dir", default="lora-output",
                   help="where checkpoints, validation images, logs and weights go")
    g.add_argument("--resolution", type=number(int, min=8), default=512,
                   help="training resolution (square; a multiple of 64 for SD1.x: 256, 512, 768, ...)")
    g.add_argument("--center_crop", action=argparse.BooleanOptionalAction, default=True,
                   help="center crop after resizing (--no-center_crop: random crop; needs --no_cache)")
    g.add_argument("--random_flip", action="store_true", help="mirror images at random (both flips are cached)")
    g.add_argument("--strict_data", action="store_true", help="stop on any bad dataset entry instead of skipping it")
    g.add_argument("--no_cache", action="store_true",
                   help="encode images and captions every step (the original script's way)")
    g.add_argument("--enable_bucket", action="store_true",
                   help="aspect-ratio buckets: each image trains at the size of about --resolution^2 pixels "
                        "nearest its aspect ratio; a batch holds one size (kohya's semantics)")
    g.add_argument("--min_bucket_reso", type=number(int, min=8), default=256, help="smallest bucket side (px)")
    g.add_argument("--max_bucket_reso", type=number(int, min=8), default=1024, help="largest bucket side (px)")
    g.add_argument("--bucket_reso_steps", type=number(int, min=8), default=64,
                   help="bucket sides are multiples of this (64 for SD1.x)")

    g = p.add_argument_group("training")
    g.add_argument("--train_batch_size", type=number(int, min=1), default=2, help="images per micro-batch")
    g.add_argument("--gradient_accumulation_steps", type=number(int, min=1), default=1,
                   help="micro-batches per optimizer update")
    g.add_argument("--max_train_steps", type=number(int, min=1), default=None,
                   help=f"optimizer updates (default {DEFAULT_STEPS} unless --num_train_epochs is given)")
    g.add_argument("--num_train_epochs", type=number(int, min=1), default=None,
                   help="passes over the data (used when --max_train_steps is not set)")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute activations in backward: less memory, ~10-40%% more time per step")
    g.add_argument("--base_dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the frozen UNet weights and activations; LoRA, optimizer and loss stay float32 "
                        "(no float16: it needs float32 GroupNorm/softmax statistics; bfloat16 is emulated on M1/M2)")
    g.add_argument("--memory_limit_gb", type=number(float, min=0), default=None,
                   help="memory budget for MLX's scheduler (mlx_sd.memory); default with --gradient_checkpointing "
                        "on the CPU: UNet weights + 1 GB, otherwise MLX's own; 0 = MLX's own")
    g.add_argument("--snr_gamma", type=number(float, min=0), default=0.0,
                   help="min-SNR loss weighting gamma (5.0 is common; 0 = off)")
    g.add_argument("--noise_offset", type=number(float, min=0), default=0.0, help="noise offset (e.g. 0.05; 0 = off)")
    g.add_argument("--seed", type=number(int, min=0), default=42,
                   help="seed for data order, noise, timesteps and LoRA init")

    g = p.add_argument_group("LoRA")
    g.add_argument("--lora_rank", type=number(int, min=1), default=8, help="LoRA rank r")
    g.add_argument("--lora_alpha", type=number(float, min=0, min_open=True), default=16.0,
                   help="LoRA alpha (scale = alpha / r)")
    g.add_argument("--lora_dropout", type=number(float, min=0, max=1, max_open=True), default=0.0,
                   help="dropout on the LoRA input")
    g.add_argument("--lora_targets", nargs="+", default=list(DEFAULT_TARGETS), help="attention projections to adapt")
    g.add_argument("--train_text_encoder", action="store_true",
                   help="also train a LoRA on the CLIP text encoder (same rank, alpha, dropout); its embeddings are "
                        "then computed every step instead of cached")
    g.add_argument("--text_encoder_targets", nargs="+", default=list(TEXT_ENCODER_TARGETS),
                   help=f"text-encoder layers to adapt, from: {' '.join(TEXT_ENCODER_ALLOWED)}")

    g = p.add_argument_group("optimizer")
    g.add_argument("--learning_rate", type=number(float, min=0, min_open=True), default=1e-4, help="peak learning rate")
    g.add_argument("--text_encoder_lr", type=number(float, min=0, min_open=True), default=None,
                   help="peak learning rate of the text encoder's LoRA (default: --learning_rate; same schedule)")
    g.add_argument("--lr_scheduler", default="cosine", choices=LR_SCHEDULERS, help="learning-rate schedule")
    g.add_argument("--lr_warmup_steps", type=number(int, min=0), default=500, help="linear warm-up updates")
    g.add_argument("--lr_num_cycles", type=number(float, min=0, min_open=True), default=None,
                   help="cycles for cosine (0.5) / cosine_with_restarts (1)")
    g.add_argument("--lr_power", type=number(float, min=0, min_open=True), default=1.0,
                   help="power of the polynomial schedule")
    g.add_argument("--adam_beta1", type=number(float, min=0, max=1, max_open=True), default=0.9, help="AdamW beta1")
    g.add_argument("--adam_beta2", type=number(float, min=0, max=1, max_open=True), default=0.999, help="AdamW beta2")
    g.add_argument("--adam_weight_decay", type=number(float, min=0), default=1e-2, help="AdamW decoupled weight decay")
    g.add_argument("--adam_epsilon", type=number(float, min=0, min_open=True), default=1e-8, help="AdamW epsilon")
    g.add_argument("--max_grad_norm", type=number(float, min=0), default=1.0,
                   help="clip the global gradient norm (0 = off)")

    g = p.add_argument_group("checkpoints and validation")
    g.add_argument("--checkpointing_steps", type=number(int, min=0), default=500,
                   help="save a checkpoint every N updates (0 = only at the end)")
    g.add_argument("--checkpoints_total_limit", type=number(int, min=0), default=5,
                   help="keep at most N checkpoints (oldest pruned; 0 = keep all)")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="checkpoint folder, or 'latest': the newest complete one in --output_dir")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --output_dir that holds one: its outputs move to replaced-<time>/")
    g.add_argument("--skip_nan_steps", action="store_true",
                   help="skip updates with a non-finite loss instead of stopping")
    g.add_argument("--validation_steps", type=number(int, min=0), default=500,
                   help="render validation images every N updates (0 = only at the end)")
    g.add_argument("--validation_prompts", nargs="+", default=None,
                   help="prompts, or one .txt file with a prompt per line (default: 4 product-photo prompts)")
    g.add_argument("--num_validation_images", type=number(int, min=1), default=4, help="images per validation prompt")
    g.add_argument("--validation_inference_steps", type=number(int, min=1), default=25,
                   help="sampler steps for validation images")
    g.add_argument("--validation_sampler", default="dpm++2m", choices=SAMPLERS, help="sampler for validation images")
    g.add_argument("--validation_guidance_scale", type=number(float, min=0), default=7.5,
                   help="classifier-free guidance for validation")
    g.add_argument("--validation_dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="precision of validation sampling (a half dtype samples with a fused copy of the UNet)")
    g.add_argument("--validation_width", type=number(int, min=8), default=None,
                   help="width of validation images (default --resolution); the held-out loss stays square")
    g.add_argument("--validation_height", type=number(int, min=8), default=None,
                   help="height of validation images (default --resolution)")
    g.add_argument("--no_validation", action="store_true", help="render no validation images")
    g.add_argument("--validation_split", type=number(float, min=0), default=0.0,
                   help="fraction of the images kept out of training; their loss at fixed timesteps and noise "
                        "is logged as val_loss at each validation (e.g. 0.05)")
    g.add_argument("--validation_data_dir", default=None,
                   help="a separate held-out dataset (images/ + captions.json) for val_loss instead of a split")
    g.add_argument("--save_fused_pipeline", action="store_true",
                   help="also write final_pipeline/: a full model folder with the LoRA fused in")

    g = p.add_argument_group("logging and modes")
    g.add_argument("--report_to", default="none", choices=["none", "tensorboard"],
                   help="also write TensorBoard events (needs tensorboardX)")
    g.add_argument("--check", action="store_true",
                   help="setup check: load everything, run one step, report memory and time estimates, exit")
    g.add_argument("--no_progress", action="store_true", help="no progress bars")

    argv = sys.argv[1:] if argv is None else list(argv)
    pre, _ = p.parse_known_args(argv)
    if pre.config:
        try:
            values = json.loads(Path(pre.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            p.error(f"--config {pre.config}: {e}")
        if not isinstance(values, dict):
            p.error(f"--config {pre.config}: expected a JSON object of flag names and values")
        actions = {a.dest: a for a in p._actions}
        unknown = sorted(set(values) - set(actions))
        if unknown:
            p.error(f"--config {pre.config}: unknown keys {unknown} (keys are flag names without --)")
        for key, value in values.items():  # the same checks as on the command line
            a = actions[key]
            try:
                if a.type is not None and value is not None and not isinstance(value, (list, bool)):
                    values[key] = a.type(str(value))
            except argparse.ArgumentTypeError as e:
                p.error(f"--config {pre.config}: {key}: {e}")
            if a.choices is not None and values[key] not in a.choices:
                p.error(f"--config {pre.config}: {key}: {values[key]!r} is not one of {list(a.choices)}")
        p.set_defaults(**values)
    args = p.parse_args(argv)
    if not args.train_data_dir and not args.dataset_name:
        p.error("--train_data_dir DIR (images and their captions) or --dataset_name USER/REPO (a Hub dataset) "
                "is required")
    if args.train_data_dir and args.dataset_name:
        p.error("give --train_data_dir or --dataset_name, not both")
    if args.keep_tokens and not args.shuffle_caption:
        p.error("--keep_tokens applies with --shuffle_caption (it names the tags that are not shuffled)")
    if not args.caption_separator:
        p.error("--caption_separator must not be empty")
    if args.dataset_revision and not args.dataset_name:
        p.error("--dataset_revision applies to --dataset_name")
    if args.resolution % 8:
        p.error(f"--resolution {args.resolution} is not a multiple of 8 (SD1.x needs a multiple of 64: 256, 512, ...)")
    unknown = sorted(set(args.text_encoder_targets) - set(TEXT_ENCODER_ALLOWED))
    if unknown:
        p.error(f"--text_encoder_targets {' '.join(unknown)}: choose from {' '.join(TEXT_ENCODER_ALLOWED)}")
    if not args.train_text_encoder and (args.text_encoder_lr is not None
                                        or list(args.text_encoder_targets) != list(TEXT_ENCODER_TARGETS)):
        p.error("--text_encoder_lr and --text_encoder_targets apply only with --train_text_encoder")
    if args.enable_bucket:
        from .buckets import check_flags

        why = check_flags(args.resolution, args.min_bucket_reso, args.max_bucket_reso, args.bucket_reso_steps)
        if why:
            p.error(why)
    for name in ("validation_width", "validation_height"):
        if getattr(args, name) is not None and getattr(args, name) % 8:
            p.error(f"--{name} {getattr(args, name)} is not a multiple of 8 (SD1.x needs a multiple of 64)")
    if not args.center_crop and not args.no_cache:
        p.error("random crops (--no-center_crop) change every step and cannot be cached: add --no_cache")
    if args.validation_prompts:  # a prompts file that cannot be read fails here, not after the dataset is encoded
        try:
            validation_prompts(args)
        except DataError as e:
            p.error(str(e))
    return args


def validation_prompts(args) -> list[str]:
    from mlx_sd.validation import DEFAULT_PROMPTS

    vp = args.validation_prompts
    if not vp:
        return list(DEFAULT_PROMPTS)
    if len(vp) == 1 and vp[0].endswith(".txt"):
        try:
            lines = [line.strip() for line in Path(vp[0]).expanduser().read_text(encoding="utf-8").splitlines()
                     if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise DataError(f"--validation_prompts {vp[0]}: cannot read it ({why}); give the prompts themselves, or a "
                            ".txt file with one prompt per line") from None
        if not lines:
            raise DataError(f"--validation_prompts {vp[0]}: no prompts in the file")
        return lines
    return vp
