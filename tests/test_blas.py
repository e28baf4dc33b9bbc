"""The fast BLAS path: MLX's sgemm must resolve to OpenBLAS on Linux (no timing here)."""

import subprocess
import sys

import pytest

import mlx_sd.blas as blas

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fast-BLAS preload is Linux-only")


@linux_only
def test_sgemm_resolves_to_openblas_in_this_process():
    import mlx.core as mx

    st = blas.status()
    assert st.active == "openblas", st.describe()
    a = mx.ones((64, 64))
    mx.eval(a @ a)  # MLX has bound cblas_sgemm by now
    lib = blas.resolved_sgemm_library()
    assert lib is not None and lib.endswith(blas.PATCHED_NAME), lib
    assert lib in blas.loaded_blas_libraries()


@linux_only
def test_fresh_process_and_opt_out():
    code = (
        "import mlx_sd, mlx_sd.blas as b, mlx.core as mx; mx.eval(mx.ones((8,8)) @ mx.ones((8,8)));"
        "print(b.status().active, b.resolved_sgemm_library())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "openblas" and out[1].endswith(blas.PATCHED_NAME)
    env = {"MLX_SD_BLAS": "reference", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=env).stdout.split()
    assert out == ["reference", "None"]


@linux_only
def test_late_import_is_reported():
    code = "import mlx.core, mlx_sd.blas as b; print(b.status().active, '|', b.status().reason)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("reference |") and "import mlx_sd first" in out


def test_scripts_import_mlx_sd_before_mlx():
    """The fast BLAS is put under MLX only if mlx_sd is imported before mlx.core (train.py runs as a script)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for script in (root / "train.py", *sorted((root / "benchmarks").glob("*.py"))):
        names = [a.name if isinstance(n, ast.Import) else (n.module or "")
                 for n in ast.parse(script.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))
                 for a in (n.names if isinstance(n, ast.Import) else [n])]
        first_mlx = next((i for i, m in enumerate(names) if m == "mlx" or m.startswith("mlx.")), None)
        ours = next((i for i, m in enumerate(names) if m.split(".")[0] in ("mlx_sd", "lora", "convert")), None)
        if first_mlx is not None:
            assert ours is not None and ours < first_mlx, f"{script.name}: import mlx_sd before mlx"
