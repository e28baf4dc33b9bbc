"""mlx_sd: Stable Diffusion 1.5 models, samplers and training helpers in MLX.

Importing this package first checks that MLX can run here (Python 3.10+; on macOS an arm64
Python, since MLX ships no Intel-Mac wheels), then puts a fast BLAS under MLX on Linux (see
`mlx_sd.blas`).
"""

from __future__ import annotations  # this file must parse and run its check on Python 3.9

import platform as _platform
import sys as _sys

MIN_PYTHON = (3, 10)


def platform_problem(version: tuple = tuple(_sys.version_info[:2]), system: str = _sys.platform,
                     machine: str = _platform.machine()) -> str | None:
    """Why mlx-sd-lora cannot run on this interpreter, or None when it can."""
    if tuple(version[:2]) < MIN_PYTHON:
        return (f"mlx-sd-lora needs Python {'.'.join(map(str, MIN_PYTHON))} or newer; this is "
                f"{'.'.join(map(str, version[:2]))} ({_sys.executable}). On a Mac, Apple's python3 may be 3.9: "
                "install one (brew install python@3.12, or python.org) and make the venv with python3.12")
    if system == "darwin" and machine != "arm64":
        return (f"MLX runs on Apple Silicon (arm64) only, and this Python is {machine}: an Intel Mac, or a "
                "Python running under Rosetta. Use an arm64 Python (Homebrew's /opt/homebrew/bin/python3.12 or "
                "python.org's universal2 installer) and recreate the venv")
    return None


_problem = platform_problem()
if _problem:
    raise ImportError(_problem)

from . import blas as _blas  # noqa: E402  (after the platform check)

_blas.setup()

__version__ = "0.1.0"
