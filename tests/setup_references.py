"""Install the evaluation tests' reference implementations without replacing the CPU torch.

pytorch-fid, torch-fidelity and torchmetrics (with lightning-utilities) are installed with
--no-deps: their dependencies would replace torch 2.13+cpu with a CUDA build. torchvision has no
build for this torch, so its wheel is downloaded and only its Python `torchvision/` folder is
unpacked into ~/.cache/mlx-sd-tests (or $MLX_SD_TORCHVISION_SRC's parent); tests/metrics_reference.py
mounts it as a stand-in package. Idempotent: what is there already is kept.

    python tests/setup_references.py
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGES = {"pytorch_fid": "pytorch-fid==0.3.0", "torch_fidelity": "torch-fidelity==0.4.0",
            "torchmetrics": "torchmetrics==1.9.0", "lightning_utilities": "lightning-utilities==0.15.3"}
TORCHVISION = "torchvision==0.28.0"
TV_SRC = Path(os.environ.get("MLX_SD_TORCHVISION_SRC", Path.home() / ".cache/mlx-sd-tests/torchvision"))


def main() -> int:
    missing = [spec for module, spec in PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", *missing], check=True)
    if not (TV_SRC / "models" / "inception.py").exists():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", TORCHVISION, "-d", tmp], check=True)
            wheel = next(Path(tmp).glob("torchvision-*.whl"))
            with zipfile.ZipFile(wheel) as z:
                for name in z.namelist():
                    if name.startswith("torchvision/") and not name.endswith((".so", ".dylib", ".pyd")):
                        z.extract(name, TV_SRC.parent)
    print(f"references ready: {', '.join(PACKAGES.values())}; torchvision's Python files in {TV_SRC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
