"""What the studio reads: training runs (metrics, validation images) and folders of captioned images.

A run folder is train.py's `--output_dir`: `logs/<YYYYmmdd-HHMMSS>/metrics.jsonl` (one JSON object per
line: step, epoch, loss, lr, grad_norm, s_per_step, peak_memory_gb, val_loss when measured) with a
`config.json` beside it, and `validation/epoch{e:03d}_step{s:04d}_prompt{p}_img{i}.png`. An image
folder holds `captions.json` (or `metadata.jsonl`) with the images beside it or in `images/`:
`mlx-sd-generate`'s output, or a training set of real photos.

For blind comparison every folder becomes one or more sources of (prompt, seed, image) items: one
source per validation step of a run (image i of prompt p has seed `config seed + 1000 p + i`, as
`mlx_sd.validation` draws them) and one per image folder (the seed is read from each PNG's
"parameters" text that `mlx-sd-generate` writes; real photos have none).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

VALIDATION_RE = re.compile(r"^epoch(\d+)_step(\d+)_prompt(\d+)_img(\d+)\.png$")
SEED_RE = re.compile(r"(?:^|[\s,])Seed:\s*(\d+)")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
TRAIN_DEFAULT_SEED = 42  # train.py's --seed default, for runs whose config.json is missing


class StudioError(ValueError):
    pass


@dataclass(frozen=True)
class Root:
    """One folder given on the command line; `path` is resolved, so symlinks cannot move it later."""

    id: str
    name: str
    path: Path
    is_run: bool
    has_captions: bool


def _kind(p: Path) -> tuple[bool, bool]:
    is_run = (p / "logs").is_dir() or (p / "validation").is_dir() or (p / "metrics.jsonl").is_file()
    has_captions = any((d / f).is_file() for d in (p, p / "images") for f in ("captions.json", "metadata.jsonl"))
    return is_run, has_captions


def open_roots(folders: list[str | Path]) -> list[Root]:
    """One root per folder; a folder holding several runs (e.g. `runs/`) gives one root per run inside it."""
    found: list[tuple[Path, str, bool, bool]] = []
    for folder in folders:
        p = Path(folder).expanduser()
        if not p.is_dir():
            raise StudioError(f"{folder}: folder not found "
                              "(give a train.py --output_dir or a folder with captions.json)")
        p = p.resolve()
        is_run, has_captions = _kind(p)
        if is_run or has_captions:
            found.append((p, p.name or str(p), is_run, has_captions))
            continue
        inside = [(c, f"{p.name}/{c.name}", *_kind(c)) for c in sorted(p.iterdir()) if c.is_dir()]
        inside = [c for c in inside if c[2] or c[3]]
        if not inside:
            raise StudioError(f"{folder}: neither a training run (no logs/ or validation/ in it) nor an image folder "
                              "(no captions.json or metadata.jsonl), nor a folder of those; give train.py's "
                              "--output_dir or mlx-sd-generate's --output_dir")
        found += [(c.resolve(), name, r, h) for c, name, r, h in inside]
    roots: list[Root] = []
    names: set[str] = set()
    for path, base, is_run, has_captions in found:
        name, n = base, 2
        while name in names:
            name, n = f"{base}-{n}", n + 1
        names.add(name)
        roots.append(Root(str(len(roots)), name, path, is_run, has_captions))
    return roots


def safe_path(root: Path, rel: str) -> Path:
    """`root/rel` if it is a file inside `root` after following symlinks; raises PermissionError/FileNotFoundError.

    `rel` must be relative and free of `..`: such requests are refused (ValueError) before the disk is read.
    """
    if not rel or "\x00" in rel or rel.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", rel):
        raise ValueError("absolute paths are refused")
    if ".." in re.split(r"[/\\]", rel):
        raise ValueError("'..' in a path is refused")
    try:
        target = (root / rel).resolve()
        inside = target.is_relative_to(root)
        is_file = inside and target.is_file()
    except OSError as e:  # a name longer than the file system allows, a symlink loop...
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"unreadable path ({e.strerror or e})") from None
    if not inside:
        raise PermissionError("the path leads outside the served folders")
    if not is_file:
        raise FileNotFoundError(rel)
    return target


def servable(root: Path, rel: str) -> bool:
    """Whether `safe_path` would serve `root/rel`: only such files are listed or offered for comparison."""
    try:
        safe_path(root, rel)
    except (ValueError, OSError):
        return False
    return True


# ----------------------------------------------------------------------------- metrics


def _finite_or_none(text: str):
    v = float(text)
    return v if math.isfinite(v) else None


class MetricsTail:
    """Reads a growing metrics.jsonl incrementally: only bytes after the last complete line are read again.

    Non-finite numbers (`NaN`, `Infinity`, 1e999) become None, a gap in the curve, and are listed in
    `problems` with the lines that are not JSON objects. A file replaced by another one (new inode, or
    its first bytes changed) is read again from the start and `gen` counts up, so a page holding the
    old records knows to drop them.
    """

    HEAD = 256  # bytes compared to notice a file rewritten in place

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict] = []
        self.problems: list[dict] = []
        self.gen = 0
        self._offset = 0
        self._lines = 0
        self._ident: tuple | None = None
        self._head = b""
        self._lock = threading.Lock()

    @property
    def bad_lines(self) -> int:
        return sum(1 for p in self.problems if p["kind"] == "skipped")

    def _reset(self) -> None:
        self.records, self.problems, self._offset, self._lines, self._head = [], [], 0, 0, b""
        self.gen += 1

    def _note(self, kind: str, line: int, what: str) -> None:
        if len(self.problems) < 200:  # a file of garbage must not grow every answer without bound
            self.problems.append({"kind": kind, "line": line, "what": what})

    def refresh(self) -> list[dict]:
        with self._lock:
            try:
                st = self.path.stat()
                with open(self.path, "rb") as f:
                    head = f.read(min(self.HEAD, self._offset))
                    replaced = (st.st_dev, st.st_ino) != self._ident or head != self._head[:len(head)]
                    if replaced or st.st_size < self._offset:
                        if self._ident is not None:
                            self._reset()
                        self._ident = (st.st_dev, st.st_ino)
                    if st.st_size == self._offset:
                        return self.records
                    f.seek(self._offset)
                    chunk = f.read(st.st_size - self._offset)
            except FileNotFoundError:
                return self.records
            end = chunk.rfind(b"\n")
            if end < 0:  # a line is being written: wait for its newline
                return self.records
            for line in chunk[:end].split(b"\n"):
                self._lines += 1
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line, parse_constant=lambda _: None, parse_float=_finite_or_none)
                except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
                    self._note("skipped", self._lines, f"not JSON ({e.__class__.__name__}): "
                               + line[:80].decode("utf-8", "replace"))
                    continue
                if not isinstance(rec, dict):
                    self._note("skipped", self._lines, f"not a JSON object: {line[:80].decode('utf-8', 'replace')}")
                    continue
                gaps = [k for k, v in rec.items() if v is None]
                if gaps:
                    self._note("non-finite", self._lines, f"step {rec.get('step')}: {', '.join(gaps)} not finite")
                self.records.append(rec)
            if self._offset == 0:
                self._head = chunk[:self.HEAD]
            elif len(self._head) < self.HEAD:
                self._head = (self._head + chunk)[:self.HEAD]
            self._offset += end + 1
            return self.records


def metrics_files(root: Root) -> list[tuple[str, Path]]:
    """(label, path) of every metrics.jsonl of a run, oldest first (a resumed run starts a new logs/<time>/)."""
    out = [(p.parent.name, p) for p in sorted((root.path / "logs").glob("*/metrics.jsonl"))]
    if (root.path / "metrics.jsonl").is_file():
        out.append(("metrics", root.path / "metrics.jsonl"))
    return out


def run_config(root: Root) -> dict:
    """The newest logs/<time>/config.json of a run (train.py's flags), or {}."""
    for p in sorted((root.path / "logs").glob("*/config.json"), reverse=True):
        try:
            cfg = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(cfg, dict):
            return cfg
    return {}


def validation_prompts(cfg: dict) -> list[str]:
    """The prompt texts train.py validated with (its flag, a .txt of prompts, or the default four)."""
    vp = cfg.get("validation_prompts")
    if isinstance(vp, list) and len(vp) == 1 and str(vp[0]).endswith(".txt"):
        try:
            return [s.strip() for s in Path(vp[0]).read_text(encoding="utf-8").splitlines() if s.strip()]
        except OSError:
            return []
    if isinstance(vp, list) and vp:
        return [str(s) for s in vp]
    from ..validation import DEFAULT_PROMPTS

    return list(DEFAULT_PROMPTS)


@dataclass(frozen=True)
class ValidationImage:
    epoch: int
    step: int
    prompt: int
    image: int
    rel: str


def validation_images(root: Root) -> list[ValidationImage]:
    folder = root.path / "validation"
    if not folder.is_dir():
        return []
    out = []
    for name in os.listdir(folder):
        m = VALIDATION_RE.match(name)
        if m and servable(root.path, f"validation/{name}"):
            e, s, p, i = map(int, m.groups())
            out.append(ValidationImage(e, s, p, i, f"validation/{name}"))
    return sorted(out, key=lambda v: (v.step, v.prompt, v.image))


# ----------------------------------------------------------------------------- sources and pairs


@dataclass(frozen=True)
class Item:
    root: str
    rel: str
    prompt: str
    seed: int | None


@dataclass(frozen=True)
class Source:
    id: str
    name: str
    kind: str  # "validation" or "images"
    items: tuple[Item, ...]


@dataclass(frozen=True)
class Pair:
    id: str
    a: Item
    b: Item


def _png_seed(path: Path) -> int | None:
    from PIL import Image

    try:
        with Image.open(path) as im:  # reads the chunks before the pixels only
            text = im.info.get("parameters")
    except (OSError, ValueError):  # unreadable or not an image: no seed, the item pairs on its prompt
        return None
    m = SEED_RE.search(text) if isinstance(text, str) else None
    return int(m.group(1)) if m else None


def _folder_items(root: Root) -> tuple[Item, ...]:
    from ..data import DataError, read_captions

    try:
        images, records = read_captions(root.path)
    except DataError as e:
        raise StudioError(str(e)) from None
    items = []
    for name, caption in records:
        rel = os.path.relpath(images / name, root.path)
        path = root.path / rel
        # Only what the server will serve: a symlink out of the folder would be offered, then refused.
        if Path(name).suffix.lower() not in IMAGE_SUFFIXES or not (caption or "").strip():
            continue
        if not servable(root.path, rel):
            continue
        seed = _png_seed(path) if path.suffix.lower() == ".png" else None
        items.append(Item(root.id, rel, caption.strip(), seed))
    return tuple(items)


def _stamp(root: Root) -> tuple:
    """Changes whenever a source of this root may have changed (new validation step, captions rewritten)."""
    out = []
    for p in (root.path / "validation", root.path / "captions.json", root.path / "images" / "captions.json",
              root.path / "metadata.jsonl", root.path / "images" / "metadata.jsonl"):
        try:
            st = p.stat()
            out.append((st.st_mtime_ns, st.st_size))
        except FileNotFoundError:
            out.append(None)
    return tuple(out)


class Catalog:
    """Sources of every root, recomputed only when a root's files change (PNG headers are read once)."""

    def __init__(self, roots: list[Root]):
        self.roots = {r.id: r for r in roots}
        self._cache: dict[str, tuple[tuple, list[Source]]] = {}
        self._pairs: dict[tuple[str, str], tuple[tuple, list[Pair]]] = {}
        self._lock = threading.Lock()

    def _root_sources(self, root: Root) -> list[Source]:
        stamp = _stamp(root)
        hit = self._cache.get(root.id)
        if hit and hit[0] == stamp:
            return hit[1]
        out = []
        vals = validation_images(root)
        if vals:
            cfg = run_config(root)
            prompts = validation_prompts(cfg)
            base = int(cfg.get("seed", TRAIN_DEFAULT_SEED))
            by_step = defaultdict(list)
            for v in vals:
                text = prompts[v.prompt] if v.prompt < len(prompts) else f"prompt {v.prompt}"
                by_step[v.step].append(Item(root.id, v.rel, text, base + 1000 * v.prompt + v.image))
            for step in sorted(by_step):
                out.append(Source(f"{root.id}.step{step}", f"{root.name} step {step}", "validation",
                                  tuple(by_step[step])))
        if root.has_captions:
            out.append(Source(f"{root.id}.images", root.name, "images", _folder_items(root)))
        self._cache[root.id] = (stamp, out)
        return out

    def sources(self) -> list[Source]:
        with self._lock:
            return [s for r in self.roots.values() for s in self._root_sources(r)]

    def source(self, source_id: str) -> Source | None:
        return next((s for s in self.sources() if s.id == source_id), None)

    def pairs(self, a: Source, b: Source) -> list[Pair]:
        key = (a.id, b.id)
        stamp = (a.items, b.items)
        with self._lock:
            hit = self._pairs.get(key)
            if hit and hit[0] == stamp:
                return hit[1]
            out = match(a, b)
            self._pairs[key] = (stamp, out)
            return out


def pair_id(a_source: str, a: Item, b_source: str, b: Item) -> str:
    return hashlib.sha1(f"{a_source}|{a.rel}|{b_source}|{b.rel}".encode()).hexdigest()[:16]


def match(a: Source, b: Source) -> list[Pair]:
    """Pairs with the same prompt and the same seed; an item without a seed (a real photo) pairs on prompt alone.

    Two seeded items never pair across different seeds: the comparison would then measure the noise,
    not the model. Within a prompt, items pair in file-name order.
    """
    if a.id == b.id:
        return []
    pool = defaultdict(list)
    for it in sorted(b.items, key=lambda i: i.rel):
        pool[(it.prompt, it.seed)].append(it)
    pairs, left = [], []
    for it in sorted(a.items, key=lambda i: i.rel):
        cands = pool.get((it.prompt, it.seed)) if it.seed is not None else None
        if cands:
            pairs.append((it, cands.pop(0)))
        else:
            left.append(it)
    for it in left:  # prompt-only: at least one side has no seed
        for key in ((it.prompt, None),) if it.seed is not None else [k for k in pool if k[0] == it.prompt]:
            if pool.get(key):
                pairs.append((it, pool[key].pop(0)))
                break
    return [Pair(pair_id(a.id, x, b.id, y), x, y) for x, y in pairs]
