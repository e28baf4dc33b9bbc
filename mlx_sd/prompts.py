"""Prompt templates: alternatives and named slots, expanded to a balanced set of prompts.

A template file is UTF-8 text, one item a line; blank lines and lines starting with `#` are skipped:

    # a named slot: NAME = alternative | alternative | ...
    color = black | brown | white | blue
    a professional product photo of {color} {leather|canvas|suede} casual shoes, {side view|top view}

- `{a|b|c}` is an inline slot with its own alternatives; `{name}` is a named slot (the same name used
  twice in one template takes the same value both times). An empty alternative (`{|matte }`) makes a
  word optional; runs of spaces are collapsed afterwards.
- Every other line is a template. `expand(templates)` gives every combination of every template, in
  order; `expand(templates, n, seed)` gives `n` prompts in a seeded order in which every prefix is
  balanced: the templates' counts differ by at most 1, and within a template each slot's alternatives'
  counts differ by at most 1, and no combination repeats before all of them are used. Growing `n`
  keeps the first prompts, so a run can be extended without changing what it already made.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import MlxSdError

_SLOT_DEF = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=(.*)$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class TemplateError(MlxSdError, ValueError):
    pass


@dataclass(frozen=True)
class Template:
    """`parts` alternate literal text and slot indices; `slots[i]` is (name, alternatives)."""

    text: str
    parts: tuple[str | int, ...]
    slots: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(alts) for _, alts in self.slots)

    @property
    def combinations(self) -> int:
        return math.prod(self.sizes)

    def fill(self, choice: tuple[int, ...]) -> str:
        text = "".join(p if isinstance(p, str) else self.slots[p][1][choice[p]] for p in self.parts)
        return re.sub(r"\s+([,.;:!?])", r"\1", re.sub(r"\s+", " ", text)).strip()


def _alternatives(text: str, where: str) -> tuple[str, ...]:
    alts = tuple(a.strip() for a in text.split("|"))
    if len(alts) < 2 and not alts[0]:
        raise TemplateError(f"{where}: empty slot; give alternatives as {{a|b}} or define NAME = a | b")
    if len(set(alts)) != len(alts):
        raise TemplateError(f"{where}: an alternative is listed twice in {{{text}}} (it would count double)")
    return alts


def parse(text: str, source: str = "template") -> list[Template]:
    """Templates of a template file's text; errors name the source, line and what to fix."""
    named: dict[str, tuple[str, ...]] = {}
    lines = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _SLOT_DEF.match(line)
        if m and "{" not in line:
            name = m.group(1)
            if name in named:
                raise TemplateError(f"{source} line {n}: slot {name!r} is defined twice")
            named[name] = _alternatives(m.group(2), f"{source} line {n}")
        else:
            lines.append((n, line))
    if not lines:
        raise TemplateError(f"{source}: no template lines (only slot definitions or comments)")
    out = []
    for n, line in lines:
        where = f"{source} line {n}"
        parts: list[str | int] = []
        slots: list[tuple[str, tuple[str, ...]]] = []
        index: dict[str, int] = {}
        if re.sub(r"\{[^{}]*\}", "", line).count("{") or re.sub(r"\{[^{}]*\}", "", line).count("}"):
            raise TemplateError(f"{where}: unbalanced or nested braces; slots are {{a|b}} or {{name}}, not nested")
        pos = 0
        for m in re.finditer(r"\{([^{}]*)\}", line):
            parts.append(line[pos:m.start()])
            body = m.group(1).strip()
            if not body:
                raise TemplateError(f"{where}: empty slot {{}}; give alternatives as {{a|b}} or a defined {{name}}")
            if "|" in body:
                slots.append((f"{{{body}}}", _alternatives(body, where)))
                parts.append(len(slots) - 1)
            elif _NAME.match(body):
                if body not in named:
                    raise TemplateError(f"{where}: slot {{{body}}} is not defined; add a line '{body} = a | b' "
                                        "before it, or write the alternatives inline as {a|b}")
                if body not in index:
                    slots.append((body, named[body]))
                    index[body] = len(slots) - 1
                parts.append(index[body])
            else:
                raise TemplateError(f"{where}: {{{body}}} is neither a slot name nor alternatives a|b")
            pos = m.end()
        parts.append(line[pos:])
        out.append(Template(line, tuple(parts), tuple(slots)))
    return out


def read_templates(path: str | Path) -> list[Template]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise TemplateError(f"--template {path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TemplateError(f"--template {path}: not UTF-8 text ({e})") from None
    return parse(text, str(path))


def _diagonal(sizes: tuple[int, ...], j: int) -> tuple[int, ...]:
    """Combination j (0 <= j < prod(sizes)) of an order of all combinations, each once, in which every
    prefix is balanced per slot. Slots are added one at a time: with the first ones' order (period
    p) and a new slot of k alternatives, index j takes the earlier combination j mod p and the new
    value (j + j // lcm(p, k)) mod k. The earlier slots stay balanced (whole periods plus a balanced
    prefix), the new one runs through consecutive values (balanced in every stretch), and the shift
    by j // lcm(p, k) makes the p * k pairs distinct."""
    # Recurse from the last slot back: index j for slots[:i+1] maps to j mod P_i for slots[:i].
    values = [0] * len(sizes)
    periods = [math.prod(sizes[:i]) for i in range(len(sizes))]
    for i in range(len(sizes) - 1, -1, -1):
        p, k = periods[i], sizes[i]
        values[i] = (j + j // math.lcm(p, k)) % k
        j %= p
    return tuple(values)


def balanced_choices(sizes: tuple[int, ...], count: int, seed) -> list[tuple[int, ...]]:
    """`count` choices (one index per slot): cycles through all `prod(sizes)` combinations, each once
    per cycle, in an order whose every prefix is balanced per slot (counts within 1). Each cycle
    relabels every slot's alternatives and reorders the slots at random (`seed`, the cycle)."""
    total = math.prod(sizes)
    out = []
    for i in range(count):
        cycle, j = divmod(i, total)
        if j == 0:
            rng = np.random.default_rng([*np.atleast_1d(seed).tolist(), cycle])
            order = rng.permutation(len(sizes))
            labels = [rng.permutation(k) for k in sizes]
        raw = _diagonal(tuple(sizes[s] for s in order), j)
        choice = [0] * len(sizes)
        for v, s in zip(raw, order):
            choice[s] = int(labels[s][v])
        out.append(tuple(choice))
    return out


def expand(templates: list[Template], n: int | None = None, seed: int = 0) -> list[str]:
    """Every combination of every template (n None), or n balanced prompts in a seeded order."""
    if n is None:
        return [t.fill(c) for t in templates for c in itertools.product(*map(range, t.sizes))]
    if n < 1:
        raise TemplateError(f"--num_prompts must be >= 1, got {n}")
    rng = np.random.default_rng([seed, 0])
    order = rng.permutation(len(templates))  # which template comes first in each round
    which = [int(order[i % len(templates)]) for i in range(n)]
    picks = {t: iter(balanced_choices(templates[t].sizes, which.count(t), [seed, 1, t])) for t in set(which)}
    return [templates[t].fill(next(picks[t])) for t in which]
