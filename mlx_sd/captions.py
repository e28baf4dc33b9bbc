"""Per-step caption variants: caption dropout and tag shuffling (kohya sd-scripts' semantics).

`--caption_dropout_rate p` replaces a caption by the empty caption with probability p, which
trains the unconditional prediction classifier-free guidance uses. `--shuffle_caption` splits a
caption at `--caption_separator` (",") into tags, keeps the first `--keep_tokens` in place,
shuffles the rest and joins them with ", ".

A variant is a pure function of (seed, update, position in the update's global batch) and the
caption, like every other draw of the run: a resumed run draws the same variants, and so does a
run with any number of ranks or accumulation steps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .errors import MlxSdError

logger = logging.getLogger(__name__)


class CaptionError(MlxSdError, ValueError):
    pass


@dataclass(frozen=True)
class CaptionVariants:
    dropout: float = 0.0
    shuffle: bool = False
    keep_tokens: int = 0
    separator: str = ","

    @property
    def active(self) -> bool:
        return self.dropout > 0 or self.shuffle

    def __call__(self, caption: str, seed: int, c: int, position: int) -> str:
        """The caption that the sample at `position` of update `c`'s global batch trains with."""
        if not self.active:
            return caption
        rng = np.random.default_rng(caption_key(seed, c, position))
        if self.dropout and rng.random() < self.dropout:
            return ""
        if not self.shuffle:
            return caption
        tags = self.tags(caption)
        head, tail = tags[:self.keep_tokens], tags[self.keep_tokens:]
        return ", ".join(head + [tail[i] for i in rng.permutation(len(tail))])

    def tags(self, caption: str) -> list[str]:
        return [t for t in (t.strip() for t in caption.split(self.separator)) if t]

    def check(self, captions: list[str]) -> None:
        """Refuse a --keep_tokens above every caption's tag count (nothing would be shuffled); warn
        once when it is above some captions' counts (those are never shuffled)."""
        if not self.shuffle or not self.keep_tokens:
            return
        counts = [len(self.tags(c)) for c in captions]
        short = [i for i, n in enumerate(counts) if n < self.keep_tokens]
        if not short:
            return
        i = short[0]
        example = f"{captions[i]!r} has {counts[i]} tag(s) separated by {self.separator!r}"
        if len(short) == len(captions):
            raise CaptionError(f"--keep_tokens {self.keep_tokens} is above the tag count of every caption (e.g. "
                               f"{example}): --shuffle_caption would shuffle nothing. Lower --keep_tokens, or check "
                               "--caption_separator")
        logger.warning("--keep_tokens %d is above the tag count of %d of %d captions (e.g. %s): their tags are "
                       "not shuffled", self.keep_tokens, len(short), len(captions), example)

    def for_batch(self, captions: list[str], seed: int, c: int, first: int) -> list[str]:
        """Variants of consecutive positions first, first + 1, ... of update `c`'s global batch."""
        return [self(cap, seed, c, first + j) for j, cap in enumerate(captions)]


def caption_key(seed: int, c: int, position: int) -> list[int]:
    """The generator key of the caption variant at `position` of update `c`'s global batch (see data.py)."""
    return [seed, c, position, 5, 5]
