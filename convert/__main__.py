"""`python -m convert SOURCE OUT_DIR`: a diffusers folder or Hub repo id -> an MLX model folder."""

from __future__ import annotations

import argparse
import sys

from .folder import DTYPES, ConversionError, convert_pipeline


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m convert", description=__doc__)
    p.add_argument("source", help="local diffusers folder, or Hugging Face repo id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5)")
    p.add_argument("out_dir", help="output folder for the MLX model")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it is an existing converted model")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the stored weights (default float32)")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) when SOURCE is a repo id")
    args = p.parse_args(argv)
    from mlx_sd.weights import WeightsError

    try:
        out = convert_pipeline(args.source, args.out_dir, force=args.force, dtype=args.dtype,
                               revision=args.revision, progress=True)
    except (ConversionError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"converted {args.source} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
