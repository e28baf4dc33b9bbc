"""Weight conversion: diffusers folders / Hub repos -> MLX model folders.

`python -m convert SOURCE OUT_DIR`. One pure key-mapping function per source format
(`convert.diffusers`); folder handling, downloads and atomic output in `convert.folder`.
"""

import mlx_sd  # noqa: F401  (fast BLAS before mlx.core)
