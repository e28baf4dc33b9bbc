"""Convert Stable Diffusion 1.x weights to and from MLX model folders.

  python -m convert SOURCE OUT_DIR
      SOURCE: a diffusers folder, a Hugging Face repo id, or an original single-file checkpoint
      (.safetensors; .ckpt with --allow-pickle). With --filename, SOURCE is a repo id and
      FILENAME the single file in it.
  python -m convert --to-single-file MODEL_DIR OUT.safetensors
      a converted MLX folder (a LoRA-fused one too) -> one original-layout file for A1111/ComfyUI.
  python -m convert --feature-model {inception,clip,dinov2} SOURCE OUT_DIR
      an evaluation feature model for mlx-sd-eval: pytorch-fid's pt_inception-2015-12-05-6726825d.pth
      (file or URL), openai/clip-vit-large-patch14, facebook/dinov2-large (Hub id or local folder).
"""

from __future__ import annotations

import argparse
import sys

from mlx_sd.errors import MlxSdError
from mlx_sd.model_folder import ModelFolder

from .folder import DTYPES
from .model import convert_pipeline


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="diffusers folder, Hub repo id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5), "
                                  "single-file checkpoint; with --to-single-file: a converted MLX model folder")
    p.add_argument("out_dir", help="output folder for the MLX model; with --to-single-file: the .safetensors file")
    p.add_argument("--force", action="store_true", help="replace the output if it is an existing conversion / file")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="dtype of the written weights (default: float32; with --to-single-file: as stored)")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) when SOURCE is a repo id")
    single = p.add_argument_group("single-file checkpoints")
    single.add_argument("--filename", default=None,
                        help="single file inside Hub repo SOURCE to convert (e.g. v1-5-pruned-emaonly.safetensors)")
    single.add_argument("--config_dir", "--config", dest="config", default=None, metavar="DIR",
                        help="diffusers or converted folder whose configs, tokenizer and scheduler to use "
                             "(default: the bundled SD1.5 ones)")
    single.add_argument("--allow-pickle", action="store_true",
                        help="allow .ckpt (pickle) files; read by an allow-list reader that runs no code from them")
    single.add_argument("--non-ema", action="store_true",
                        help="use the non-EMA UNet weights of a file that has both (default: EMA)")
    single.add_argument("--to-single-file", action="store_true",
                        help="export: SOURCE is a converted MLX folder, OUT_DIR the .safetensors file to write")
    p.add_argument("--feature-model", default=None, choices=("inception", "clip", "dinov2"),
                   help="convert an evaluation feature model instead of an SD pipeline (see above)")
    args = p.parse_args(argv)
    try:
        if args.feature_model:
            from .feature_models import convert_feature_model

            out = convert_feature_model(args.feature_model, args.source, args.out_dir, force=args.force,
                                        revision=args.revision)
            print(f"converted {args.source} -> {out} ({args.feature_model} feature model)")
            return 0
        if args.to_single_file:
            from .single_file import export_single_file

            out = export_single_file(args.source, args.out_dir, dtype=args.dtype, force=args.force)
            print(f"wrote {out} (original single-file layout)")
            return 0
        out = convert_pipeline(args.source, args.out_dir, force=args.force, dtype=args.dtype or "float32",
                               revision=args.revision, progress=True, filename=args.filename, config=args.config,
                               allow_pickle=args.allow_pickle, prefer_ema=not args.non_ema)
    except MlxSdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    single = ModelFolder(out).info.get("single_file")
    extra = f" (unet_weights={single['unet_weights']}, configs={single['configs']})" if single else ""
    print(f"converted {args.source} -> {out}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
