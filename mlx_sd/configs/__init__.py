"""Bundled data: the published Stable Diffusion 1.5 configs and CLIP tokenizer (`sd15/`).

Used to build full-size stand-ins, the demo model, and to convert single-file checkpoints
(which carry weights only), without any download.
"""

from pathlib import Path

SD15 = Path(__file__).parent / "sd15"
