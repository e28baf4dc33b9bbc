"""`mlx-sd-eval`: how good are the images? FID, KID, FD-DINOv2, FD-CLIP, CLIP score.

    mlx-sd-eval compare REAL_DIR GENERATED_DIR --inception M/inception --dinov2 M/dinov2 --clip M/clip
    mlx-sd-eval clip-score GENERATED_DIR --clip M/clip          (prompts from its captions.json)
    mlx-sd-eval checkpoints RUN_DIR --model MODEL --clip M/clip [--real REAL_DIR --inception M/inception]

Feature models are converted once: `python -m convert --feature-model inception
pt_inception-2015-12-05-6726825d.pth M/inception`, `--feature-model clip
openai/clip-vit-large-patch14 M/clip`, `--feature-model dinov2 facebook/dinov2-large M/dinov2`.
Each command prints a table and writes JSON (--json; `checkpoints` also a plot and the best
checkpoint). Unreadable images are named and skipped. FID needs the same N on both sides to be
comparable (pytorch-fid recommends >= 2048 images).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import MlxSdError
from ..evaluate import (LOWER_IS_BETTER, best_row, compare_folders, evaluate_set, plot_metrics, score_captions,
                        validation_sets)
from ..io import write_text
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


def _add_models(p, clip_help="CLIP feature model folder (FD-CLIP, CLIP score)"):
    g = p.add_argument_group("feature models (folders made by `python -m convert --feature-model ...`)")
    g.add_argument("--inception", help="FID InceptionV3 folder (FID, KID)")
    g.add_argument("--dinov2", help="DINOv2 folder (FD-DINOv2)")
    g.add_argument("--clip", help=clip_help)
    g = p.add_argument_group("options")
    g.add_argument("--batch_size", type=int, default=16, help="images per forward pass (does not change results)")
    g.add_argument("--kid_subsets", type=int, default=100, help="KID subsets (torch-fidelity's default)")
    g.add_argument("--kid_subset_size", type=int, default=1000,
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
    _add_models(p, clip_help="CLIP feature model folder (required)")
    p = sub.add_parser("checkpoints", help="score each checkpoint of a training run and name the best")
    p.add_argument("run_dir", help="train.py's --output_dir (with checkpoints/ and validation/)")
    p.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                   help="the base model the run trained on (as train.py's --model)")
    p.add_argument("--real", help="reference images for FID/KID/FD (e.g. the training photos)")
    p.add_argument("--from_validation", action="store_true",
                   help="score the run's validation/ images per step instead of generating new ones")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (default: the validation prompts)")
    p.add_argument("--prompts_file", help=".txt with one prompt per line, or a .json list")
    p.add_argument("--num_images_per_prompt", type=int, default=4, help="images generated per prompt and checkpoint")
    p.add_argument("--seed", type=int, default=0, help="seed: the same images' seeds for every checkpoint")
    p.add_argument("--steps", type=int, default=25, help="sampler steps")
    p.add_argument("--resolution", type=int, default=512, help="image size in pixels")
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


def _prompts(args) -> list[str]:
    from ..generate import read_prompts
    from ..validation import DEFAULT_PROMPTS

    return read_prompts(args.prompt, args.prompts_file) if (args.prompt or args.prompts_file) else list(DEFAULT_PROMPTS)


def run_checkpoints(args) -> int:
    from ..checkpoint import list_checkpoints

    run = Path(args.run_dir).expanduser()
    out = Path(args.output_dir).expanduser() if args.output_dir else run / "eval"
    models = _models(args)
    if not models:
        raise MetricError("no feature model given (--clip for CLIP score; --real with --inception/--dinov2/--clip)")
    real = list_images(args.real) if args.real else None
    prompts = _prompts(args)
    sets: list[tuple[int, ImageList, dict[Path, str]]] = []
    if args.from_validation:
        for step, items in validation_sets(run / "validation").items():
            paths = [p for p, _ in items]
            captions = {p: prompts[i] for p, i in items if i < len(prompts)}
            sets.append((step, ImageList(run / "validation", paths, []), captions))
        if not sets:
            raise MetricError(f"{run / 'validation'}: no validation images (epoch..._step..._prompt.._img..png)")
    else:
        from ..generate import main as generate_main

        ckpts = list_checkpoints(run / "checkpoints")
        if not ckpts:
            raise MetricError(f"{run / 'checkpoints'}: no checkpoint-<step> folders")
        for step, path in ckpts:
            folder = out / f"checkpoint-{step}"
            argv = ["--model", args.model, "--lora", str(path),
                    "--num_images_per_prompt", str(args.num_images_per_prompt),
                    "--seed", str(args.seed), "--steps", str(args.steps), "--height", str(args.resolution),
                    "--width", str(args.resolution), "--output_dir", str(folder)]
            for p in prompts:
                argv += ["--prompt", p]
            print(f"checkpoint-{step}: generating {len(prompts) * args.num_images_per_prompt} images -> {folder}")
            if generate_main(argv) != 0:
                raise MetricError(f"generation for checkpoint-{step} failed (see above)")
            images = list_images(folder)
            captions = json.loads((folder / "captions.json").read_text())
            sets.append((step, images, {p: captions[p.name] for p in images.paths if p.name in captions}))
    rows = []
    for step, images, captions in sets:
        res = evaluate_set(images, captions, real, models, kid_subsets=args.kid_subsets,
                           kid_subset_size=args.kid_subset_size, batch_size=args.batch_size, cache=not args.no_cache)
        rows.append({"step": step, **res})
    keys = [k for k in METRIC_NAMES if any(k in r for r in rows)]
    select = args.select or ("fid" if "fid" in keys else keys[0])
    best = best_row(rows, select)
    print(table(rows, "step", keys))
    for note in sorted({n for r in rows for n in r.get("notes", [])}):
        print(f"note: {note}")
    if best is not None:
        print(f"best checkpoint by {METRIC_NAMES[select]}: step {best['step']}")
    result = {"run": str(run), "prompts": prompts, "select": select, "best_step": best and best["step"], "rows": rows}
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
