import os
import sys
from pathlib import Path

# mlx_sd must be imported before anything imports mlx.core: it installs the fast BLAS on Linux.
import mlx_sd  # noqa: F401
import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fixtures import make_tiny_pipeline  # noqa: E402


@pytest.fixture(scope="session")
def tiny_diffusers_dir(tmp_path_factory) -> Path:
    """A tiny SD1.5-shaped diffusers pipeline folder (seed 0), built once per session."""
    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "diffusers")


@pytest.fixture(scope="session")
def tiny_mlx_dir(tiny_diffusers_dir, tmp_path_factory) -> Path:
    """The tiny pipeline converted to the MLX folder layout by the real `convert` code path."""
    from convert.model import convert_pipeline

    out = tmp_path_factory.mktemp("tiny_mlx") / "mlx"
    convert_pipeline(tiny_diffusers_dir, out)
    return out
