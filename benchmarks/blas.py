"""Float32 matmul and conv throughput of MLX with and without the fast-BLAS path.

Each configuration runs in a fresh process (the BLAS choice is made before mlx.core loads):
MLX with mlx_sd's OpenBLAS preload (the default), MLX on the wheel's reference BLAS
(MLX_SD_BLAS=reference), and torch for reference when installed.

    python benchmarks/blas.py
"""

import json
import os
import subprocess
import sys

MLX_CODE = """
import json, mlx_sd
from mlx_sd.doctor import bench
from mlx_sd import blas
print(json.dumps({"blas": blas.status().describe(), **bench()}))
"""

TORCH_CODE = """
import json, time, torch
torch.manual_seed(0)
def g(fn, flops, r=3):
    fn(); t = time.perf_counter()
    for _ in range(r): fn()
    return flops * r / (time.perf_counter() - t) / 1e9
n = 2048
a, b = torch.randn(n, n), torch.randn(n, n)
x, w = torch.randn(1, 320, 64, 64), torch.randn(320, 320, 3, 3)
print(json.dumps({"blas": f"torch {torch.__version__}, {torch.get_num_threads()} threads",
    "matmul_2048_gflops": g(lambda: a @ b, 2 * n**3),
    "conv3x3_64x64x320_gflops": g(lambda: torch.nn.functional.conv2d(x, w, padding=1), 2*64*64*320*320*9)}))
"""


def run(code: str, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if out.returncode != 0:
        return {"blas": f"failed: {out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    rows = [("mlx (fast path)", run(MLX_CODE)), ("mlx (reference BLAS)", run(MLX_CODE, {"MLX_SD_BLAS": "reference"}))]
    try:
        import torch  # noqa: F401

        rows.append(("torch", run(TORCH_CODE)))
    except ImportError:
        pass
    print(f"{'config':<22} {'matmul 2048^2':>14} {'conv 3x3':>10}  blas")
    for name, r in rows:
        mm, cv = r.get("matmul_2048_gflops"), r.get("conv3x3_64x64x320_gflops")
        fmt = lambda v: f"{v:8.1f} GF/s" if v is not None else "       n/a"  # noqa: E731
        print(f"{name:<22} {fmt(mm):>14} {fmt(cv):>10}  {r['blas']}")
    fast, ref = rows[0][1], rows[1][1]
    if "matmul_2048_gflops" in fast and "matmul_2048_gflops" in ref:
        print(f"speed-up from the fast path: matmul {fast['matmul_2048_gflops'] / ref['matmul_2048_gflops']:.1f}x, "
              f"conv {fast['conv3x3_64x64x320_gflops'] / ref['conv3x3_64x64x320_gflops']:.1f}x")


if __name__ == "__main__":
    main()
