"""One command, one report to paste into an issue: MLX vs diffusers+peft training steps on this machine.

On a Mac: MLX on Metal against torch on MPS (same SD1.5 UNet shape, LoRA r=8, AdamW, float32,
same batch), with the chip, macOS version, memory, MLX/torch versions and the device choices
mlx_sd makes here (`mlx_sd.device`). Elsewhere the same on the CPU (torch CPU as the reference).
It runs `benchmarks/train_step.py`'s workers, one fresh process per framework and shape.

    python benchmarks/mac_report.py                       # 512 px batch 1 and 2, checkpointing on
    python benchmarks/mac_report.py --sizes 256 --batches 1 --steps 1 --warmup 0   # quick
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import mlx_sd  # noqa: F401  (first: puts the fast BLAS under MLX before mlx.core loads)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import measure, parser, table


def _sysctl(name: str) -> str | None:
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5, check=False)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> dict[str, str]:
    """Chip, OS and memory, the way a bug report wants them."""
    import mlx.core as mx

    from mlx_sd import device, memory

    mem = memory.machine_memory()
    info = {"python": platform.python_version(), "mlx": mx.__version__, "mlx device": str(mx.default_device())}
    if sys.platform == "darwin":
        info["chip"] = _sysctl("machdep.cpu.brand_string") or platform.processor()
        info["macOS"] = f"{platform.mac_ver()[0]} ({platform.machine()})"
        info["cores"] = f"{_sysctl('hw.perflevel0.logicalcpu') or '?'} performance + " \
                        f"{_sysctl('hw.perflevel1.logicalcpu') or '?'} efficiency"
    else:
        info["cpu"] = mx.device_info().get("device_name", platform.processor()) if hasattr(mx, "device_info") else ""
        info["os"] = f"{platform.system()} {platform.release()} ({platform.machine()})"
        info["cores"] = str(os.cpu_count())
    info["memory"] = f"{mem.total_gb:.1f} GB ({mem.usable_gb:.1f} GB usable: {mem.source})"
    info["device choices"] = device.current().upper() + " column of `mlx-sd-doctor`"
    try:
        import torch

        info["torch"] = f"{torch.__version__} (MPS available: {torch.backends.mps.is_available()})"
    except ImportError:
        info["torch"] = "not installed (pip install -e '.[dev]')"
    return info


def main() -> None:
    p = parser()
    p.description = __doc__.split("\n\n")[0]
    p.set_defaults(sizes=[512], batches=[1, 2], checkpointing="on")
    args = p.parse_args()
    info = machine()
    print("collecting (each shape runs MLX, then torch, in fresh processes)...", flush=True)
    rows = measure(args)
    print("\n---- paste from here ----")
    print("### mlx-sd-lora training step, MLX vs diffusers+peft\n")
    for k, v in info.items():
        print(f"- {k}: {v}")
    print(f"- settings: SD1.5 UNet shape, random weights, LoRA r=8, AdamW, {args.base_dtype} base, "
          f"{args.warmup} warm-up + {args.steps} timed steps (median), memory budget {args.memory_limit_gb}")
    print("- command: `python benchmarks/mac_report.py " + " ".join(sys.argv[1:]) + "`\n")
    print("\n".join(table(rows, args.base_dtype)))
    print("---- to here ----")


if __name__ == "__main__":
    main()
