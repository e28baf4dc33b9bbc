"""mlx_sd: Stable Diffusion 1.5 models, samplers and training helpers in MLX.

Importing this package first puts a fast BLAS under MLX on Linux (see `mlx_sd.blas`).
"""

from . import blas as _blas

_blas.setup()

__version__ = "0.1.0"
