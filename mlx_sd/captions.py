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

from dataclasses import dataclass

import numpy as np


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
        tags = [t.strip() for t in caption.split(self.separator)]
        tags = [t for t in tags if t]
        head, tail = tags[:self.keep_tokens], tags[self.keep_tokens:]
        return ", ".join(head + [tail[i] for i in rng.permutation(len(tail))])

    def for_batch(self, captions: list[str], seed: int, c: int, first: int) -> list[str]:
        """Variants of consecutive positions first, first + 1, ... of update `c`'s global batch."""
        return [self(cap, seed, c, first + j) for j, cap in enumerate(captions)]


def caption_key(seed: int, c: int, position: int) -> list[int]:
    """The generator key of the caption variant at `position` of update `c`'s global batch (see data.py)."""
    return [seed, c, position, 5, 5]
