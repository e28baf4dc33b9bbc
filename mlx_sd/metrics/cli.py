"""`mlx-sd-eval`: how good are the images? FID, KID, FD-DINOv2, FD-CLIP, CLIP score.

    mlx-sd-eval compare REAL_DIR GENERATED_DIR --inception M/inception --dinov2 M/dinov2 --clip M/clip
    mlx-sd-eval clip-score GENERATED_DIR --clip M/clip          (prompts from its captions.json)
    mlx-sd-eval checkpoints RUN_DIR --clip M/clip [--real REAL_DIR --inception M/inception]

Feature models are converted once: `python -m convert --feature-model inception
pt_inception-2015-12-05-6726825d.pth M/inception`, `--feature-model clip
openai/clip-vit-large-patch14 M/clip`, `--feature-model dinov2 facebook/dinov2-large M/dinov2`.
Each command prints a table and writes JSON (--json; `checkpoints` also a plot and the best
checkpoint). `checkpoints` takes the base model, prompts, size, seed and sampler from the run's
saved settings (logs/<time>/config.json); flags override them. Unreadable images are named and
skipped. FID needs the same N on both sides to be comparable (pytorch-fid recommends >= 2048 images).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli import number
from ..errors import MlxSdError
from ..evaluate import (LOWER_IS_BETTER, best_row, check_plan, compare_folders, evaluate_set, plot_metrics,
                        read_captions_file, run_prompts, run_settings, score_captions, validation_sets)
from ..io import write_text
from ..schedulers import SAMPLERS
from .features import FeatureModel
from .images import ImageList, list_images
from .scores import MetricError

METRIC_NAMES = {"fid": "FID", "kid_mean": "KID", "fd_dinov2": "FD-DINOv2", "fd_clip": "FD-CLIP",
                "clip_score": "CLIP score"}


def _models(args) -> list[FeatureModel]:
    return [FeatureModel.load(getattr(args, k)) for k in ("inception", "dinov2", "clip") if getattr(args, k, None)]


def _write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def _fmt(key: str, r: dict) -> str:
    v = r.get(key)
    if not isinstance(v, (int, float)):
        return "-"
    if key == "kid_mean" and isinstance(r.get("kid_std"), float):
        return f"{v:.5f} ± {r['kid_std']:.5f}"
    return f"{v:.4f}" if key in ("clip_score",) else f"{v:.3f}"


def table(rows: list[dict], first: str, keys: list[str]) -> str:
    head = [first] + [METRIC_NAMES[k] for k in keys]
    body = [[str(r.get(first, ""))] + [_fmt(k, r) for k in keys] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
    return "\n".join([line, "-" * len(line)] + ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body])


def _add_models(p, clip_help="CLIP feature model folder (FD-CLIP, CLIP score)", clip_only=False):
    g = p.add_argument_group("feature models (folders made by `python -m convert --feature-model ...`)")
    if not clip_only:
        g.add_argument("--inception", help="FID InceptionV3 folder (FID, KID)")
        g.add_argument("--dinov2", help="DINOv2 folder (FD-DINOv2)")
    g.add_argument("--clip", help=clip_help)
    g = p.add_argument_group("options")
    g.add_argument("--batch_size", type=number(int, min=1), default=16,
                   help="images per forward pass (does not change results)")
    if not clip_only:
        g.add_argument("--kid_subsets", type=number(int, min=1), default=100,
                       help="KID subsets (torch-fidelity's default)")
        g.add_argument("--kid_subset_size", type=number(int, min=2), default=1000,
                       help="images per KID subset (torch-fidelity's default; reduced to the smaller set's size, "
                            "with a note, when a set is smaller)")
    g.add_argument("--no_cache", action="store_true", help="do not read or write the feature cache")
    g.add_argument("--json", help="also write the results to this JSON file")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mlx-sd-eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compare", help="real vs generated folder: FID, KID, FD-DINOv2, FD-CLIP")
    p.add_argument("real", help="reference images (a folder, or a dataset folder with images/)")
    p.add_argument("generated", help="images to judge")
    _add_models(p)
    p = sub.add_parser("clip-score", help="CLIP score of a folder against its captions.json, overall and per prompt")
    p.add_argument("folder", help="images + captions.json (what mlx-sd-generate writes)")
    _add_models(p, clip_help="CLIP feature model folder (required)", clip_only=True)
    p = sub.add_parser("checkpoints", help="score each checkpoint of a training run and name the best")
    p.add_argument("run_dir", help="train.py's --output_dir (with checkpoints/ and validation/)")
    p.add_argument("--model", default=None,
                   help="the base model to generate with (default: the one the run trained on, from its config.json)")
    p.add_argument("--real", help="reference images for FID/KID/FD (e.g. the training photos)")
    p.add_argument("--from_validation", action="store_true",
                   help="score the run's validation/ images per step instead of generating new ones")
    p.add_argument("--prompt", action="append", default=[],
                   help="a prompt (default: the run's validation prompts, from its config.json)")
    p.add_argument("--prompts_file", help=".txt with one prompt per line, or a .json list")
    p.add_argument("--num_images_per_prompt", type=number(int, min=1), default=None,
                   help="images generated per prompt and checkpoint (default: the run's --num_validation_images)")
    p.add_argument("--seed", type=number(int, min=0), default=None,
                   help="seed: the same images' seeds for every checkpoint (default: the run's --seed)")
    p.add_argument("--steps", type=number(int, min=1), default=None,
                   help="sampler steps (default: the run's --validation_inference_steps)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="sampler (default: the run's --validation_sampler)")
    p.add_argument("--guidance_scale", type=number(float, min=0), default=None,
                   help="classifier-free guidance (default: the run's --validation_guidance_scale)")
    p.add_argument("--resolution", type=number(int, min=8), default=None,
                   help="image size in pixels (default: the run's validation size, else its --resolution)")
    p.add_argument("--select", choices=sorted(LOWER_IS_BETTER), default=None,
                   help="metric that picks the best checkpoint (default: fid with --real, else clip_score)")
    p.add_argument("--output_dir", help="where images, checkpoints.json and checkpoints.png go (default RUN_DIR/eval)")
    _add_models(p)
    p = sub.add_parser("demo-models", help="random-weight stand-ins of the three feature models (for trying the "
                                           "commands; their numbers measure nothing)")
    p.add_argument("out_dir", help="folder for inception/, clip/ and dinov2/")
    return ap


def _print_notes(res: dict) -> None:
    for s in res.get("skipped", []):
        print(f"skipped {s}")
    for n in res.get("notes", []):
        print(f"note: {n}")


def run_compare(args) -> int:
    res = compare_folders(args.real, args.generated, _models(args), kid_subsets=args.kid_subsets,
                          kid_subset_size=args.kid_subset_size, batch_size=args.batch_size, cache=not args.no_cache)
    keys = [k for k in METRIC_NAMES if k in res]
    res["set"] = f"{res['n_generated']} generated vs {res['n_real']} real"
    print(table([res], "set", keys))
    _print_notes(res)
    if args.json:
        _write_json(Path(args.json), res)
    return 0


def run_clip_score(args) -> int:
    if not args.clip:
        raise MetricError("clip-score needs --clip (a converted CLIP model folder)")
    res = score_captions(args.folder, FeatureModel.load(args.clip), batch_size=args.batch_size,
                         cache=not args.no_cache)
    rows = [{"prompt": (t[:60] + "...") if len(t) > 63 else t, "clip_score": v["clip_score"], "n": v["n"]}
            for t, v in sorted(res["per_prompt"].items())]
    rows.append({"prompt": f"all ({res['n']} images)", "clip_score": res["clip_score"]})
    print(table(rows, "prompt", ["clip_score"]))
    if res["uncaptioned"]:
        print(f"note: {res['uncaptioned']} images have no caption and were not scored")
    _print_notes(res)
    if args.json:
        _write_json(Path(args.json), res)
    return 0


def _prompts(args, cfg: dict, source: Path | None) -> tuple[list[str], str]:
    """The prompts to score with, and where they came from: the flags, else the run's validation prompts."""
    from ..generate import read_prompts

    if args.prompt or args.prompts_file:
        return read_prompts(args.prompt, args.prompts_file), "--prompt/--prompts_file"
    return run_prompts(cfg, source), str(source) if source else "the default validation prompts (no saved settings)"


def _generation(args, run: Path, cfg: dict, source: Path | None) -> dict:
    """mlx-sd-generate's settings for every checkpoint: the flags, else what the run validated with."""
    model = args.model
    if model is None:
        model_dir = cfg.get("model_dir")
        model = model_dir if model_dir and Path(model_dir).is_dir() else (
            cfg.get("model") or cfg.get("pretrained_model_name_or_path"))
    if not model:
        raise MetricError(f"{run}: no saved settings (logs/<time>/config.json) name the base model; give --model "
                          "(the model the run trained on)")
    square = args.resolution
    return {"model": str(model),
            "width": square or cfg.get("validation_width") or cfg.get("resolution") or 512,
            "height": square or cfg.get("validation_height") or cfg.get("resolution") or 512,
            "seed": args.seed if args.seed is not None else cfg.get("seed", 0),
            "num_images_per_prompt": args.num_images_per_prompt or cfg.get("num_validation_images") or 4,
            "steps": args.steps or cfg.get("validation_inference_steps") or 25,
            "sampler": args.sampler or cfg.get("validation_sampler"),
            "guidance_scale": args.guidance_scale if args.guidance_scale is not None
            else cfg.get("validation_guidance_scale")}


def run_checkpoints(args) -> int:
    from ..checkpoint import list_checkpoints

    run = Path(args.run_dir).expanduser()
    if not run.is_dir():
        raise MetricError(f"{run}: no such folder (give train.py's --output_dir)")
    out = Path(args.output_dir).expanduser() if args.output_dir else run / "eval"
    cfg, source = run_settings(run)
    prompts, prompts_from = _prompts(args, cfg, source)
    models = _models(args)
    real = list_images(args.real) if args.real else None
    # Everything that can be wrong is checked here, before any image is generated or featurised.
    if args.from_validation:
        found = validation_sets(run / "validation")
        if not found:
            raise MetricError(f"{run / 'validation'}: no validation images (epoch..._step..._prompt.._img..png)")
        beyond = sorted({i for items in found.values() for _, i in items if i >= len(prompts)})
        if beyond:
            raise MetricError(f"{run / 'validation'}: images of prompt {beyond[0]} but only {len(prompts)} prompts "
                              f"(from {prompts_from}); give the run's prompts with --prompts_file or --prompt")
        sizes = {f"step {step}": len(items) for step, items in found.items()}
        settings = None
    else:
        ckpts = list_checkpoints(run / "checkpoints")
        if not ckpts:
            raise MetricError(f"{run / 'checkpoints'}: no checkpoint-<step> folders")
        settings = _generation(args, run, cfg, source)
        sizes = {f"checkpoint-{step}": len(prompts) * settings["num_images_per_prompt"] for step, _ in ckpts}
    keys = check_plan(models, real, sizes, with_captions=True, select=args.select)
    select = args.select or ("fid" if "fid" in keys else keys[0])
    print(f"{len(prompts)} prompts from {prompts_from}")

    sets: list[tuple[int, ImageList, dict[Path, str]]] = []
    if args.from_validation:
        for step, items in found.items():
            sets.append((step, ImageList(run / "validation", [p for p, _ in items], []),
                         {p: prompts[i] for p, i in items}))
    else:
        from ..generate import main as generate_main

        print("generating with " + ", ".join(f"{k} {v}" for k, v in settings.items() if v is not None)
              + (f" (from {source})" if source else ""))
        for step, path in ckpts:
            folder = out / f"checkpoint-{step}"
            argv = ["--lora", str(path), "--output_dir", str(folder)]
            for key, value in settings.items():
                if value is not None:
                    argv += [f"--{key}", str(value)]
            for p in prompts:
                argv += ["--prompt", p]
            print(f"checkpoint-{step}: generating {sizes[f'checkpoint-{step}']} images -> {folder}")
            if generate_main(argv) != 0:
                raise MetricError(f"generation for checkpoint-{step} failed (see above)")
            images = list_images(folder)
            sets.append((step, images, dict(read_captions_file(folder, images))))
    rows = []
    for step, images, captions in sets:
        res = evaluate_set(images, captions, real, models, kid_subsets=args.kid_subsets,
                           kid_subset_size=args.kid_subset_size, batch_size=args.batch_size, cache=not args.no_cache)
        rows.append({"step": step, **res})
    keys = [k for k in METRIC_NAMES if any(k in r for r in rows)]
    best = best_row(rows, select)
    print(table(rows, "step", keys))
    for note in sorted({n for r in rows for n in r.get("notes", [])}):
        print(f"note: {note}")
    if best is not None:
        print(f"best checkpoint by {METRIC_NAMES[select]}: step {best['step']}")
    result = {"run": str(run), "settings_file": str(source) if source else None, "prompts": prompts,
              "generation": settings, "select": select, "best_step": best and best["step"], "rows": rows}
    _write_json(out / "checkpoints.json", result)
    plot = plot_metrics(rows, keys, out / "checkpoints.png")
    print(f"wrote {out / 'checkpoints.json'}" + (f" and {plot}" if plot else ""))
    if args.json:
        _write_json(Path(args.json), result)
    return 0


def run_demo_models(args) -> int:
    from .tiny import make_tiny_feature_models

    for kind, folder in make_tiny_feature_models(args.out_dir).items():
        print(f"wrote {folder} (random {kind} stand-in)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"compare": run_compare, "clip-score": run_clip_score, "checkpoints": run_checkpoints,
                "demo-models": run_demo_models}
    try:
        return commands[args.command](args)
    except MlxSdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
