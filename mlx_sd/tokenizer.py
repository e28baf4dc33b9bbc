"""CLIP tokenization to fixed-length ids, as the SD1.x pipelines do.

`padding="max_length"`, `max_length=77`, truncation on; SD1.5 pads with `<|endoftext|>`.
Prompts longer than 75 content tokens are truncated (with a warning naming the dropped text).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .config import ConfigError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# transformers advises at import that PyTorch is missing; this package uses only its tokenizer.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
logger = logging.getLogger(__name__)


class Tokenizer:
    def __init__(self, folder: str | Path, max_length: int | None = None):
        # transformers is a dependency for its tokenizer only (no torch needed for this).
        from transformers import CLIPTokenizer
        from transformers.utils import logging as hf_logging

        folder = Path(folder)
        if not (folder / "vocab.json").exists() and not (folder / "tokenizer.json").exists():
            raise ConfigError(f"{folder}: no CLIP tokenizer files (vocab.json + merges.txt); "
                              "re-run `python -m convert SOURCE OUT_DIR --force`")
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            self.tok = CLIPTokenizer.from_pretrained(str(folder))
        finally:
            hf_logging.set_verbosity(verbosity)
        self.max_length = max_length or min(self.tok.model_max_length, 77)

    @property
    def pad_id(self) -> int:
        return self.tok.pad_token_id

    def __call__(self, prompts: str | list[str]) -> np.ndarray:
        """Token ids [B, max_length] int32."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = self.tok(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True
        ).input_ids
        for p in prompts:
            full = self.tok(p, truncation=False).input_ids
            if len(full) > self.max_length:
                dropped = self.tok.decode(full[self.max_length - 1 : -1])
                logger.warning("prompt truncated to %d tokens; dropped: %r", self.max_length, dropped)
        return np.asarray(ids, dtype=np.int32)
