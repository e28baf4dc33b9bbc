"""`mlx-sd-doctor` / `python -m mlx_sd.doctor`: what this machine runs MLX on.

Prints the MLX version and device, which BLAS MLX's CPU matmuls and convolutions reach (on
Linux: OpenBLAS preloaded by mlx_sd, or the wheel's slow reference BLAS), the machine's memory,
which speed and memory choices hold on this device (`mlx_sd.device`), and with `--bench` a
quick float32 matmul/conv throughput figure.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

from . import blas, device, memory


def _gflops(fn, flops: float, repeats: int = 3) -> float:
    import mlx.core as mx

    mx.eval(fn())
    t = time.perf_counter()
    for _ in range(repeats):
        mx.eval(fn())
    return flops * repeats / (time.perf_counter() - t) / 1e9


def bench() -> dict[str, float]:
    import mlx.core as mx

    n = 2048
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    x, w = mx.random.normal((1, 64, 64, 320)), mx.random.normal((320, 3, 3, 320))
    mx.eval(a, b, x, w)
    return {
        "matmul_2048_gflops": _gflops(lambda: a @ b, 2 * n**3),
        "conv3x3_64x64x320_gflops": _gflops(lambda: mx.conv2d(x, w, padding=1), 2 * 64 * 64 * 320 * 320 * 9),
    }


def report(run_bench: bool = False) -> dict:
    import mlx.core as mx

    st = blas.status()
    info = {
        "python": sys.version.split()[0],
        "platform": f"{platform.system()} {platform.machine()}",
        "mlx": getattr(mx, "__version__", "?"),
        "device": str(mx.default_device()),
        "metal": bool(getattr(mx, "metal", None) and mx.metal.is_available()),
        "blas": st.describe(),
        "cpu_count": os.cpu_count(),
    }
    mem = memory.machine_memory()
    info["memory"] = f"{mem.usable_gb:.1f} GB usable of {mem.total_gb:.1f} GB ({mem.source})"
    if sys.platform.startswith("linux"):
        info["cblas_sgemm_from"] = blas.resolved_sgemm_library() or "MLX's bundled reference BLAS"
    if run_bench:
        info.update({k: round(v, 1) for k, v in bench().items()})
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mlx-sd-doctor", description=__doc__.splitlines()[0])
    p.add_argument("--bench", action="store_true", help="also time a 2048^2 matmul and a 3x3 conv (float32)")
    args = p.parse_args(argv)
    info = report(args.bench)
    width = max(map(len, info))
    for k, v in info.items():
        print(f"{k:<{width}}  {v}")
    print("\n".join(device.describe()))
    if sys.platform.startswith("linux") and blas.status().active != "openblas":
        print("warning: MLX runs on the slow reference BLAS here (~40x slower matmuls); see the reason above")
    return 0


if __name__ == "__main__":
    sys.exit(main())
