"""`mlx-sd-generate`: images from a model plus LoRA adapters, one or thousands, resumable.

    mlx-sd-generate --model models/sd15 --lora out/lora_weights:0.8 \\
        --prompts_file prompts.txt --num_images_per_prompt 4 --output_dir synthetic

The output folder is a training set as `train.py` reads it: `images/prompt{p:05d}_img{i:03d}.png`
and `captions.json` (`{"file.png": "prompt"}`). Image i of prompt p uses the seed derived from
(--seed, p, i) (`image_seed`, stored in each PNG's "parameters" text), so any image can be made
again alone, and the result does not depend on --batch_size.

Resuming: a PNG counts as done once it exists (written to a temp file, then renamed), and
captions.json is rewritten atomically after every batch. Re-running the same command skips
finished images; Ctrl-C stops cleanly. The settings that shape the images are kept in
`generation.json`; a re-run with different ones is refused rather than mixing two datasets
(--num_images_per_prompt and extra prompts at the end may grow: existing names keep their meaning).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import MlxSdError
from .io import is_repo_id, write_text
from .pipeline import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, save_png
from .schedulers import SAMPLERS

SETTINGS_FILE = "generation.json"
CAPTIONS_FILE = "captions.json"


class GenerateError(MlxSdError, ValueError):
    pass


@dataclass(frozen=True)
class Job:
    name: str
    prompt: str
    seed: int
    prompt_index: int
    image_index: int


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The seed of one image, from the run seed and its place; independent of batching."""
    import numpy as np

    return int(np.random.SeedSequence([seed, prompt_index, image_index]).generate_state(1)[0])


def image_name(prompt_index: int, image_index: int) -> str:
    return f"prompt{prompt_index:05d}_img{image_index:03d}.png"


def plan(prompts: list[str], num_images_per_prompt: int, seed: int) -> list[Job]:
    return [Job(image_name(p, i), prompt, image_seed(seed, p, i), p, i)
            for p, prompt in enumerate(prompts) for i in range(num_images_per_prompt)]


# ----------------------------------------------------------------------------- inputs


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
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
    if not out:
        raise GenerateError("no prompts: give --prompt TEXT (repeatable) or --prompts_file FILE")
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
        raise GenerateError(f"--lora {spec!r}: adapter {p} not found (a PEFT folder, or a diffusers/kohya .safetensors file)")
    return p, scale


def _check_model_arg(model: str) -> None:
    p = Path(model).expanduser()
    if p.exists():
        return
    if not is_repo_id(model):
        raise GenerateError(f"--model {model}: model folder not found (give a converted folder, a diffusers "
                            "folder or a Hub repo id such as stable-diffusion-v1-5/stable-diffusion-v1-5)")


# ----------------------------------------------------------------------------- output folder



def _read_captions(out: Path) -> dict[str, str]:
    path = out / CAPTIONS_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise GenerateError(f"{path}: invalid JSON ({e}); delete it and re-run (it is rebuilt from the images)") from None
    if not isinstance(data, dict):
        raise GenerateError(f"{path}: expected a mapping {{file: caption}}; is {out} another dataset?")
    return data


def write_captions(out: Path, images: Path, captions: dict[str, str]) -> None:
    """captions.json for every listed file that exists, sorted by name (prompt-major)."""
    present = {k: v for k, v in captions.items() if (images / k).is_file()}
    write_text(out / CAPTIONS_FILE, json.dumps(dict(sorted(present.items())), indent=1, ensure_ascii=False) + "\n")


def _settings(args, loras: list[tuple[Path, float]]) -> dict:
    model = Path(args.model).expanduser()
    return {
        "model": str(model.resolve()) if model.exists() else args.model,
        "lora": [[str(p.resolve()), s] for p, s in loras],
        "negative_prompt": args.negative_prompt,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "sampler": args.sampler,
        "seed": args.seed,
        "height": args.height,
        "width": args.width,
    }


def _check_settings(out: Path, settings: dict) -> None:
    path = out / SETTINGS_FILE
    if path.exists() and any((out / "images").glob("*.png")):
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
        if diff:
            raise GenerateError(
                f"{out} holds images made with other settings:\n  " + "\n  ".join(diff)
                + "\nRe-run with the old settings to resume, or use another --output_dir.")


def _check_prompts(out: Path, existing: dict[str, str], jobs: list[Job]) -> None:
    wrong = [f"{j.name}: {existing[j.name]!r} (now {j.prompt!r})"
             for j in jobs if j.name in existing and existing[j.name] != j.prompt]
    if wrong:
        raise GenerateError(f"{out}: {len(wrong)} existing image(s) were made from other prompts, e.g.\n  "
                            + "\n  ".join(wrong[:5]) + "\nUse the same prompts (same order) to resume, or another --output_dir.")


def _parameters(job: Job, args) -> str:
    """A1111-style text, so other tools show how the image was made."""
    return (f"{job.prompt}\nNegative prompt: {args.negative_prompt}\n"
            f"Steps: {args.steps}, Sampler: {args.sampler}, CFG scale: {args.guidance_scale}, "
            f"Seed: {job.seed}, Size: {args.width}x{args.height}, Model: {args.model}"
            + "".join(f", Lora: {spec}" for spec in args.lora))


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mlx-sd-generate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = ap.add_argument_group("model")
    g.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                   help="converted MLX folder, diffusers folder or Hub repo id (converted once into the cache)")
    g.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="LoRA adapter (PEFT folder or diffusers/kohya .safetensors), fused at SCALE; repeat to stack")
    g = ap.add_argument_group("prompts")
    g.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    g.add_argument("--prompts_file", help=".txt with one prompt per line, or a .json list of strings")
    g.add_argument("--negative_prompt", default="", help="negative prompt for every image")
    g.add_argument("--num_images_per_prompt", type=int, default=1, help="images made from each prompt")
    g = ap.add_argument_group("sampling")
    g.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="sampler steps")
    g.add_argument("--guidance_scale", type=float, default=DEFAULT_GUIDANCE,
                   help="classifier-free guidance scale (<= 1 turns guidance off)")
    g.add_argument("--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER, help="sampler (pndm is SD1.5's own)")
    g.add_argument("--seed", type=int, default=0, help="run seed; each image's seed is derived from it and its place")
    g.add_argument("--height", type=int, default=512, help="image height in pixels (multiple of 64 for SD1.5)")
    g.add_argument("--width", type=int, default=512, help="image width in pixels (multiple of 64 for SD1.5)")
    g.add_argument("--batch_size", type=int, default=1, help="images per batch (does not change the images)")
    g = ap.add_argument_group("output")
    g.add_argument("--output_dir", required=True, help="folder for images/ and captions.json (a training set)")
    return ap


def run(args) -> int:
    prompts = read_prompts(args.prompt, args.prompts_file)
    loras = [parse_lora(s) for s in args.lora]
    for name in ("num_images_per_prompt", "steps", "batch_size", "height", "width"):
        if getattr(args, name) < 1:
            raise GenerateError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.seed < 0:
        raise GenerateError(f"--seed must be >= 0, got {args.seed}")
    _check_model_arg(args.model)

    # Everything that can be refused is checked before the output folder is touched.
    out = Path(args.output_dir).expanduser()
    if out.exists() and not out.is_dir() or (out / "images").exists() and not (out / "images").is_dir():
        raise GenerateError(f"--output_dir {out}: a file is in the way; the output must be a folder path")
    images = out / "images"
    jobs = plan(prompts, args.num_images_per_prompt, args.seed)
    existing = _read_captions(out)
    _check_prompts(out, existing, jobs)
    settings = _settings(args, loras)
    _check_settings(out, settings)
    captions = dict(existing)
    done = {j.name for j in jobs if (images / j.name).is_file()}
    captions.update({j.name: j.prompt for j in jobs if j.name in done})
    todo = [j for j in jobs if j.name not in done]
    if not todo:
        write_captions(out, images, captions)  # rebuilds a lost or stale captions.json
        print(f"all {len(jobs)} images already in {images}; nothing to do")
        return 0

    from tqdm import tqdm

    from .pipeline import StableDiffusion

    try:
        sd = StableDiffusion.from_folder(args.model)
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

    images.mkdir(parents=True, exist_ok=True)
    for stale in [*images.glob(".*.tmp-*"), *out.glob(".*.tmp-*")]:  # left by a killed run
        stale.unlink(missing_ok=True)
    # Written once the model and adapters load, so a typo in --model does not pin the folder.
    write_text(out / SETTINGS_FILE, json.dumps(settings, indent=2) + "\n")
    write_captions(out, images, captions)
    if done:
        print(f"resuming: {len(done)} of {len(jobs)} images already in {images}")
    # rate_noinv: always images/s (tqdm would flip to s/img below 1 img/s).
    bar = tqdm(total=len(jobs), initial=len(done), unit="img", desc="generating", dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}]")
    made, t0 = 0, time.perf_counter()
    try:
        for s in range(0, len(todo), args.batch_size):
            batch = todo[s : s + args.batch_size]
            pil = sd.generate([j.prompt for j in batch], negative_prompt=args.negative_prompt, steps=args.steps,
                              guidance_scale=args.guidance_scale, sampler=args.sampler,
                              seed=[j.seed for j in batch], height=args.height, width=args.width)
            for job, im in zip(batch, pil):
                save_png(im, images / job.name, _parameters(job, args))
                captions[job.name] = job.prompt
                made += 1
            write_captions(out, images, captions)
            bar.update(len(batch))
    except KeyboardInterrupt:
        bar.close()
        write_captions(out, images, captions)
        print(f"\ninterrupted: {len(done) + made} of {len(jobs)} images are in {images}.\n"
              "Re-run the same command to resume; finished images are kept and skipped.", file=sys.stderr)
        return 130
    bar.close()
    dt = time.perf_counter() - t0
    print(f"made {made} images in {dt:.1f} s ({made / dt:.2f} img/s); {len(jobs)} in {images}, "
          f"captions in {out / CAPTIONS_FILE}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except MlxSdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
