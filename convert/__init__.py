"""Weight conversion: diffusers folders / Hub repos / single-file checkpoints <-> MLX model folders.

`python -m convert SOURCE OUT_DIR` (and `--to-single-file MODEL_DIR OUT.safetensors`). One pure
key-mapping function per format: `convert.layout` (diffusers <-> MLX layout), `convert.ldm`
(original single-file names <-> diffusers names). Diffusers folders and Hub repos in
`convert.folder`; single files in `convert.single_file`; `convert.model` picks one for a source
and keeps the cache of converted models (`resolve_model`).
"""

import mlx_sd  # noqa: F401  (fast BLAS before mlx.core)
