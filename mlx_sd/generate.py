"""`mlx-sd-generate`: images from a model plus LoRA adapters, one or thousands, resumable.

    mlx-sd-generate --model models/sd15 --lora out/lora_weights:0.8 \\
        --prompts_file prompts.txt --num_images_per_prompt 4 --output_dir synthetic

The output folder is a training set as `train.py` reads it: `images/prompt{p:05d}_img{i:03d}.png`
and `captions.json` (a list of `{"file_name", "text", "seed"}` records). Image i of prompt p uses
the seed derived from (--seed, p, i) (`image_seed`, also stored in each PNG's "parameters" text), so
any image can be made again alone, and the result does not depend on --batch_size.

Prompts come from --prompt, --prompts_file and --template files (`mlx_sd.prompts`: alternatives
and slots expanded to all combinations, or to --num_prompts balanced ones in a --seed order).
--dtype float16/bfloat16 samples in half precision (`mlx_sd.pipeline`). Images/min is shown in the
progress bar and at the end; a batch's VAE decode overlaps the next batch's sampling.

Several Macs: the same command under `mlx.launch` splits each global batch of --batch_size x ranks
images between the ranks; an image's seed is the one it has in one process, so the images are the
same. Rank 0 reads the output folder, says which images are left, receives every rank's images and
writes all files; the other ranks need no output folder. A run that loses a rank stops with the
finished images kept, and the same command resumes it.

Resuming: a PNG counts as done once it exists (written to a temp file, then renamed), and its
record is in the journal captions.json is rebuilt from (`mlx_sd.generate_folder.Records`).
Re-running the same command skips finished images; Ctrl-C stops cleanly. The settings that shape
the images are kept in `generation.json` (each adapter by the sha256 of its files); a re-run with
different ones, or with a retrained adapter, is refused rather than mixing two datasets
(--num_images_per_prompt and extra prompts at the end may grow: existing names keep their meaning).
A folder holding images that mlx-sd-generate did not make and its captions.json does not list is
refused: its captions.json would make train.py leave those images out.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from . import distributed
from .cli import HelpFormatter, number
from .errors import MlxSdError
from .generate_folder import (CAPTIONS_FILE, REJECTED_DIR, REJECTED_FILE, SETTINGS_FILE, GenerateError, Job, Records,
                              image_name, image_seed, parameters, plan, prepare, record, settings_of, write_captions)
from .io import is_repo_id, write_text
from .pipeline import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, DTYPES, save_png
from .schedulers import SAMPLERS

__all__ = ["CAPTIONS_FILE", "SETTINGS_FILE", "GenerateError", "Job", "build_parser", "image_name", "image_seed",
           "main", "plan", "read_prompts", "run"]
_parameters = parameters


# ----------------------------------------------------------------------------- inputs


def read_prompts(prompts: list[str], prompts_file: str | None, templates: list[str] | None = None,
                 num_prompts: int | None = None, seed: int = 0) -> list[str]:
    out = list(prompts or [])
    if prompts_file:
        path = Path(prompts_file).expanduser()
        if not path.is_file():
            raise GenerateError(f"--prompts_file {path}: file not found")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise GenerateError(f"--prompts_file {path}: invalid JSON ({e})") from None
            if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
                raise GenerateError(f"--prompts_file {path}: expected a JSON list of strings")
            file_prompts = [p.strip() for p in data]
            empty = [i for i, p in enumerate(file_prompts) if not p]
            if empty:
                raise GenerateError(f"--prompts_file {path}: entry {empty[0]} is an empty prompt")
        elif path.suffix.lower() in (".txt", ""):
            file_prompts = [line.strip() for line in text.splitlines() if line.strip()]
        else:
            raise GenerateError(f"--prompts_file {path}: expected a .txt file (one prompt per line) "
                                "or a .json list of strings")
        if not file_prompts:
            raise GenerateError(f"--prompts_file {path}: no prompts in it")
        out += file_prompts
    if templates:
        from .prompts import expand, read_templates

        out += expand([t for f in templates for t in read_templates(f)], num_prompts, seed)
    elif num_prompts is not None:
        raise GenerateError("--num_prompts applies to --template prompts; give a --template file")
    if not out:
        raise GenerateError("no prompts: give --prompt TEXT (repeatable), --prompts_file FILE or --template FILE")
    for i, p in enumerate(out):
        if not p.strip():
            raise GenerateError(f"prompt {i} is empty (captions must not be)")
    return [p.strip() for p in out]


def parse_lora(spec: str) -> tuple[Path, float]:
    """`PATH` or `PATH:SCALE` -> (path, scale); the path must exist."""
    path, scale = spec, 1.0
    if ":" in spec and not Path(spec).expanduser().exists():
        head, tail = spec.rsplit(":", 1)
        try:
            scale = float(tail)
        except ValueError:
            raise GenerateError(f"--lora {spec!r}: expected PATH or PATH:SCALE with SCALE a number") from None
        path = head
    if not path:
        raise GenerateError(f"--lora {spec!r}: no adapter path")
    p = Path(path).expanduser()
    if not p.exists():
        raise GenerateError(f"--lora {spec!r}: adapter {p} not found "
                            "(a PEFT folder, or a diffusers/kohya .safetensors file)")
    return p, scale


def _check_model_arg(model: str) -> None:
    p = Path(model).expanduser()
    if p.exists():
        return
    if not is_repo_id(model):
        raise GenerateError(f"--model {model}: model folder not found (give a converted folder, a diffusers "
                            "folder or a Hub repo id such as stable-diffusion-v1-5/stable-diffusion-v1-5)")


# ----------------------------------------------------------------------------- several ranks


def _agree(world: distributed.World, error: MlxSdError | None) -> None:
    """Every rank stops if any rank refused; the refusing rank raises its own message."""
    if world.any(error is not None):
        raise error or GenerateError("another rank refused the run (its message above says why)")


def _check_same_command(world: distributed.World, settings: dict, jobs: list[Job]) -> None:
    if world.size == 1:
        return
    import mlx.core as mx
    import numpy as np

    mine = distributed.digest(json.dumps(settings, sort_keys=True), *(f"{j.name}\0{j.prompt}" for j in jobs))
    local = mx.array(np.frombuffer(mine, np.uint32).copy())
    if world.any(not np.array_equal(np.array(world.broadcast({"d": local})["d"]), np.array(local))):
        raise distributed.DistributedError(
            "the ranks are not running the same generate command: settings, prompts or templates differ "
            "(a file may differ between the Macs); every rank must run the same command with the same files")


def _gather(world: distributed.World, images, per_rank: list[int]):
    """Every rank's uint8 images [b_r, H, W, 3] -> all of them in rank order (meaningful on rank 0)."""
    if world.size == 1:
        return images
    import mlx.core as mx
    import numpy as np

    b = max(per_rank)
    pad = np.zeros((b - len(images), *images.shape[1:]), np.uint8)
    allr = np.array(mx.distributed.all_gather(mx.array(np.concatenate([images, pad])), group=world.group))
    return np.concatenate([allr[r * b:r * b + n] for r, n in enumerate(per_rank)])


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mlx-sd-generate", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    g = ap.add_argument_group("model")
    g.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                   help="converted MLX folder, diffusers folder or Hub repo id (converted once into the cache)")
    g.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="LoRA adapter (PEFT folder or diffusers/kohya .safetensors), fused at SCALE; repeat to stack")
    g.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="precision of the text encoder, UNet and VAE (the sampler's arithmetic stays float32)")
    g = ap.add_argument_group("prompts")
    g.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    g.add_argument("--prompts_file", help=".txt with one prompt per line, or a .json list of strings")
    g.add_argument("--template", action="append", default=[], metavar="FILE",
                   help="prompt template file: lines with {a|b} alternatives and {name} slots (NAME = a | b)")
    g.add_argument("--num_prompts", type=number(int, min=1), default=None,
                   help="prompts drawn from the templates, balanced, in a --seed order (default: all combinations)")
    g.add_argument("--negative_prompt", default="", help="negative prompt for every image")
    g.add_argument("--num_images_per_prompt", type=number(int, min=1), default=1, help="images made from each prompt")
    g = ap.add_argument_group("sampling")
    g.add_argument("--steps", type=number(int, min=1), default=DEFAULT_STEPS, help="sampler steps")
    g.add_argument("--guidance_scale", type=float, default=DEFAULT_GUIDANCE,
                   help="classifier-free guidance scale (<= 1 turns guidance off)")
    g.add_argument("--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER, help="sampler (pndm is SD1.5's own)")
    g.add_argument("--seed", type=number(int, min=0), default=0,
                   help="run seed; each image's seed is derived from it and its place")
    g.add_argument("--height", type=number(int, min=1), default=512,
                   help="image height in pixels (multiple of 64 for SD1.5)")
    g.add_argument("--width", type=number(int, min=1), default=512,
                   help="image width in pixels (multiple of 64 for SD1.5)")
    g.add_argument("--batch_size", type=number(int, min=1), default=1,
                   help="images per batch and rank (does not change the images)")
    g = ap.add_argument_group("filtering")
    g.add_argument("--clip_model", metavar="DIR",
                   help="a converted CLIP model (python -m convert --feature-model clip SOURCE DIR): each image's "
                        "CLIP score against its prompt is recorded in captions.json")
    g.add_argument("--min_clip_score", type=number(float), default=None, metavar="SCORE",
                   help="images scoring under SCORE (100 x cosine, e.g. 25) go to rejected/ with their score in "
                        "rejected.json instead of images/; needs --clip_model")
    g = ap.add_argument_group("output")
    g.add_argument("--output_dir", required=True, help="folder for images/ and captions.json (a training set)")
    return ap


def _load(args, loras):
    from .pipeline import StableDiffusion

    try:
        sd = StableDiffusion.from_folder(args.model, dtype=args.dtype)
    except MlxSdError as e:
        raise GenerateError(f"--model {args.model}: {e}") from None
    try:
        sd.check_size(args.height, args.width)
    except ValueError as e:
        raise GenerateError(str(e)) from None
    for path, scale in loras:
        try:
            sd.add_adapter(path, scale)
        except MlxSdError as e:
            raise GenerateError(f"--lora: {e}") from None
    return sd


def run(args, world: distributed.World | None = None) -> int:
    world = world or distributed.World(None, 0, 1)
    prompts = read_prompts(args.prompt, args.prompts_file, args.template, args.num_prompts, args.seed)
    loras = [parse_lora(s) for s in args.lora]
    _check_model_arg(args.model)
    out = Path(args.output_dir).expanduser()
    images = out / "images"
    jobs = plan(prompts, args.num_images_per_prompt, args.seed)
    settings = settings_of(args, loras)
    _check_same_command(world, settings, jobs)

    # Everything that can be refused is checked before the output folder is touched.
    captions, done, error = {}, set(), None
    if world.main:
        try:
            captions, done = prepare(args, out, jobs, settings)
        except MlxSdError as e:
            error = e
    _agree(world, error)
    if world.size > 1:  # rank 0's folder decides what is left
        import mlx.core as mx

        flags = mx.array([int(j.name in done) for j in jobs], mx.int32)
        done = {j.name for j, f in zip(jobs, world.broadcast({"f": flags})["f"].tolist()) if f}
    todo = [j for j in jobs if j.name not in done]
    if not todo:
        if world.main:
            write_captions(out, images, captions)  # rebuilds a lost or stale captions.json
            print(f"all {len(jobs)} images already in {images}; nothing to do")
        return 0

    sd, clip, error = None, None, None
    try:
        sd = _load(args, loras)
        if args.clip_model and world.main:  # rank 0 receives every image, so it alone scores them
            from .clip_filter import ClipFilter

            clip = ClipFilter(args.clip_model, args.min_clip_score)
    except MlxSdError as e:
        error = e
    _agree(world, error)
    if world.main:
        images.mkdir(parents=True, exist_ok=True)
        if args.min_clip_score is not None:
            (out / REJECTED_DIR).mkdir(exist_ok=True)
        for stale in [*images.glob(".*.tmp-*"), *out.glob(".*.tmp-*")]:  # left by a killed run
            stale.unlink(missing_ok=True)
        # Written once the model and adapters load, so a typo in --model does not pin the folder.
        write_text(out / SETTINGS_FILE, json.dumps(settings, indent=2) + "\n")
        write_captions(out, images, captions)
        if done:
            print(f"resuming: {len(done)} of {len(jobs)} images already in {images}")
        if world.size > 1:
            print(f"{world.size} ranks: {len(todo)} images in global batches of {args.batch_size} x {world.size}")
    return _make(args, world, sd, jobs, todo, captions, out, clip)


def _make(args, world, sd, jobs: list[Job], todo: list[Job], captions: dict, out: Path, clip=None) -> int:
    from PIL import Image
    from tqdm import tqdm

    images = out / "images"
    records = Records(out, captions)
    bs, gbs = args.batch_size, args.batch_size * world.size
    batches = [todo[s:s + gbs] for s in range(0, len(todo), gbs)]
    mine = [gb[world.rank * bs:(world.rank + 1) * bs] for gb in batches]
    stream = sd.stream((([j.prompt for j in b], [j.seed for j in b]) for b in mine),
                       negative_prompt=args.negative_prompt, steps=args.steps, guidance_scale=args.guidance_scale,
                       sampler=args.sampler, height=args.height, width=args.width)
    first = len(jobs) - len(todo)
    # rate: images/min (tqdm's own rate would flip to s/img below 1 img/s).
    bar = tqdm(total=len(jobs), initial=first, unit="img", desc="generating", dynamic_ncols=True,
               disable=not world.main, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")
    made, aside, t0 = 0, 0, time.perf_counter()
    stop = _StopOnSigterm()
    try:
        for gb, local in zip(batches, stream):
            if stop.asked:  # a batch finished before the stop: keep this rank's images, no more collectives
                gb, pixels = gb[world.rank * bs:(world.rank + 1) * bs], local
            else:
                pixels = _gather(world, local, [len(gb[r * bs:(r + 1) * bs]) for r in range(world.size)])
            if world.main:
                scores = clip.scores(pixels, [j.prompt for j in gb]) if clip else [None] * len(gb)
                saved = []
                try:
                    for job, px, score in zip(gb, pixels, scores):
                        keep = score is None or args.min_clip_score is None or score >= args.min_clip_score
                        save_png(Image.fromarray(px), (images if keep else out / REJECTED_DIR) / job.name,
                                 parameters(job, args))
                        saved.append(record(job, score))
                        aside += not keep
                finally:
                    records.add(saved)
            made += len(gb)
            bar.set_postfix_str(f"{60 * made / (time.perf_counter() - t0):.2f} img/min"
                                + (f", {aside} set aside" if args.min_clip_score is not None else ""), refresh=False)
            bar.update(len(gb))
    except KeyboardInterrupt:
        bar.close()
        if world.main:
            records.flush()
            done = sum((images / j.name).is_file() for j in jobs)
            why = "interrupted"
            if stop.sigterm:
                why = f"{world.tag}stopped (SIGTERM)" + (
                    "; under mlx.launch this means another rank failed or was killed (its [WARN] line names it)"
                    if world.size > 1 else "")
            print(f"\n{why}: {done} of {len(jobs)} images are in {images}.\n"
                  "Re-run the same command to resume; finished images are kept and skipped.", file=sys.stderr)
        return 143 if stop.sigterm else 130
    except RuntimeError as e:
        why = world.lost(e)
        if why is None:
            raise
        bar.close()
        if world.main:
            records.flush()
        print(f"{world.tag}error: {why}\n{first + made} of {len(jobs)} images are in {images}; "
              "re-run the same command to make the rest.", file=sys.stderr)
        return 1
    finally:
        stop.restore()
    bar.close()
    dt = time.perf_counter() - t0
    if world.main:
        records.flush()
        print(f"made {made} images in {dt:.1f} s ({60 * made / dt:.2f} images/min); {len(jobs)} in {images}, "
              f"captions in {out / CAPTIONS_FILE}")
        if args.min_clip_score is not None:
            from .clip_filter import summary

            print("\n".join(summary(list(captions.values()), args.min_clip_score)))
            print(f"images under the threshold are kept in {out / REJECTED_DIR}, listed with their scores in "
                  f"{out / REJECTED_FILE}")
    return 0


class _StopOnSigterm:
    """SIGTERM (mlx.launch stops the other ranks this way when one fails) stops like Ctrl-C."""

    def __init__(self):
        self.asked = self.sigterm = False
        self.previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _handle(self, signum, frame):
        self.asked = True
        self.sigterm |= signum == signal.SIGTERM
        raise KeyboardInterrupt

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.min_clip_score is not None and not args.clip_model:
        parser.error("--min_clip_score needs --clip_model DIR (a CLIP model converted with "
                     "python -m convert --feature-model clip SOURCE DIR)")
    world = distributed.init()
    try:
        return run(args, world)
    except MlxSdError as e:
        print(f"{world.tag}error: {e}", file=sys.stderr)
        if world.size > 1 and isinstance(e, distributed.DistributedError):
            world.barrier()  # every rank reports before any exits (mlx.launch stops the others)
        return 2


if __name__ == "__main__":
    sys.exit(main())
