"""What every command line of the product shares: checked numeric flags and one help style.

A numeric flag declares its range with `number(int, min=1)`; a value outside it is an argparse
error (exit 2) that names the flag, the value and the allowed range, before any work starts.
"""

from __future__ import annotations

import argparse
import math


def number(kind: type = int, min: float | None = None, max: float | None = None, min_open: bool = False,
           max_open: bool = False):
    """An argparse `type` for `kind` (int or float) values in [min, max] (open ends where asked)."""
    lo = "" if min is None else (f"> {min}" if min_open else f">= {min}")
    hi = "" if max is None else (f"< {max}" if max_open else f"<= {max}")
    allowed = " and ".join(x for x in (lo, hi) if x)

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        bad = (min is not None and (value <= min if min_open else value < min)) or \
              (max is not None and (value >= max if max_open else value > max))
        if bad:
            raise argparse.ArgumentTypeError(f"{text} is out of range: expected a value {allowed}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid ... value" messages
    return parse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default once: not for None/False defaults, nor where the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text.lower():
            return text
        return super()._get_help_string(action)
