"""Peak resident set size, in the same unit on every platform.

`resource.getrusage(...).ru_maxrss` counts bytes on macOS but KiB on Linux (and the BSDs); every
benchmark and test that reports RSS goes through here. This file imports neither MLX nor torch,
so a torch reference process can use it without loading MLX.
"""

from __future__ import annotations

import resource
import sys


def peak_rss_bytes(children: bool = False) -> int:
    """Peak RSS of this process, or of its finished (waited-for) children, in bytes."""
    rss = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024


def peak_rss_gb(children: bool = False) -> float:
    return peak_rss_bytes(children) / 1e9
