"""Weight conversion: diffusers folders / Hub repos / single-file checkpoints <-> MLX model folders.

`python -m convert SOURCE OUT_DIR` (and `--to-single-file MODEL_DIR OUT.safetensors`). One pure
key-mapping function per format: `convert.diffusers` (diffusers <-> MLX layout), `convert.ldm`
(original single-file names <-> diffusers names). Folder handling, downloads and atomic output
in `convert.folder`; single files in `convert.single_file`.
"""

import mlx_sd  # noqa: F401  (fast BLAS before mlx.core)
