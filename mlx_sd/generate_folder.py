"""The output folder of `mlx-sd-generate`: which images exist, their records, and the settings.

`images/` holds accepted images, `rejected/` those under --min_clip_score (kept, not deleted);
`captions.json` lists the accepted ones and `rejected.json` the others, each as
`{"file_name", "text", "seed"[, "clip_score"]}`; `generation.json` holds the settings that shape the
images, so a re-run with other settings is refused instead of mixing two datasets. An adapter is
recorded by the sha256 of its files, so a retrained adapter at the same path is another adapter.

While a run writes, each batch's records are appended to a journal (`.captions.journal.jsonl`) and
the two JSON files are rewritten only when the records not yet in them reach a tenth of those that
are, and at the end: writing N images costs O(N) bytes in all, not O(N^2). The journal is read
back on resume, so a killed run loses no record.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import MlxSdError
from .io import file_digest, write_text

SETTINGS_FILE = "generation.json"
CAPTIONS_FILE = "captions.json"
REJECTED_FILE = "rejected.json"
REJECTED_DIR = "rejected"
JOURNAL_FILE = ".captions.journal.jsonl"
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
_GENERATED = re.compile(r"prompt\d{5,}_img\d{3,}\.png")


class GenerateError(MlxSdError, ValueError):
    pass


@dataclass(frozen=True)
class Job:
    name: str
    prompt: str
    seed: int
    prompt_index: int
    image_index: int


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The seed of one image, from the run seed and its place; independent of batching."""
    import numpy as np

    return int(np.random.SeedSequence([seed, prompt_index, image_index]).generate_state(1)[0])


def image_name(prompt_index: int, image_index: int) -> str:
    return f"prompt{prompt_index:05d}_img{image_index:03d}.png"


def plan(prompts: list[str], num_images_per_prompt: int, seed: int) -> list[Job]:
    return [Job(image_name(p, i), prompt, image_seed(seed, p, i), p, i)
            for p, prompt in enumerate(prompts) for i in range(num_images_per_prompt)]


def _read_records(out: Path, name: str) -> dict[str, dict]:
    """{file: record} from a records file: records as written here, or an older {file: prompt} mapping."""
    path = out / name
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise GenerateError(f"{path}: invalid JSON ({e}); delete it and re-run "
                            "(it is rebuilt from the images)") from None
    if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
        return {k: {"file_name": k, "text": v} for k, v in data.items()}
    if isinstance(data, list) and all(isinstance(r, dict) and isinstance(r.get("file_name"), str)
                                      and isinstance(r.get("text"), str) for r in data):
        return {r["file_name"]: r for r in data}
    raise GenerateError(f"{path}: expected a list of {{file_name, text, seed}} records; is {out} another dataset?")


def _read_journal(out: Path) -> dict[str, dict]:
    """Records appended since the JSON files were last written; a line cut short by a kill is dropped
    (its image, if saved, gets its record back from the plan)."""
    path, found = out / JOURNAL_FILE, {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(r, dict) and isinstance(r.get("file_name"), str) and isinstance(r.get("text"), str):
                found[r["file_name"]] = r
    return found


def read_captions(out: Path) -> dict[str, dict]:
    """Every image's record, accepted (captions.json) and set aside (rejected.json), and the journal's."""
    return {**_read_records(out, REJECTED_FILE), **_read_records(out, CAPTIONS_FILE), **_read_journal(out)}


def record(job: Job, clip_score: float | None = None) -> dict:
    r = {"file_name": job.name, "text": job.prompt, "seed": job.seed}
    if clip_score is not None:
        r["clip_score"] = round(float(clip_score), 4)
    return r


def _write_records(out: Path, folder: Path, name: str, records: dict[str, dict]) -> None:
    files = set(os.listdir(folder)) if folder.is_dir() else set()  # one listing, not a stat per record
    present = [records[k] for k in sorted(records) if k in files]
    write_text(out / name, json.dumps(present, indent=1, ensure_ascii=False) + "\n")


def write_captions(out: Path, images: Path, captions: dict[str, dict]) -> None:
    """captions.json for every listed file in images/, sorted by name (prompt-major); rejected.json
    likewise for rejected/ (only once it exists). The journal is then redundant and removed."""
    _write_records(out, images, CAPTIONS_FILE, captions)
    if (out / REJECTED_DIR).is_dir():
        _write_records(out, out / REJECTED_DIR, REJECTED_FILE, captions)
    (out / JOURNAL_FILE).unlink(missing_ok=True)


class Records:
    """The records of a run in progress (rank 0): `add` after each batch, `flush` at the end."""

    def __init__(self, out: Path, captions: dict[str, dict]):
        self.out, self.images, self.captions = out, out / "images", captions
        self.written, self.pending = len(captions), 0

    def add(self, records: list[dict]) -> None:
        for r in records:
            self.captions[r["file_name"]] = r
        with open(self.out / JOURNAL_FILE, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self.pending += len(records)
        if self.pending >= max(1, self.written // 10):
            self.flush()

    def flush(self) -> None:
        write_captions(self.out, self.images, self.captions)
        self.written, self.pending = len(self.captions), 0


def is_done(out: Path, name: str) -> bool:
    """An image is done once its PNG is in images/ or, under the CLIP filter, in rejected/."""
    return (out / "images" / name).is_file() or (out / REJECTED_DIR / name).is_file()


def settings_of(args, loras: list[tuple[Path, float]]) -> dict:
    model = Path(args.model).expanduser()
    return {
        "model": str(model.resolve()) if model.exists() else args.model,
        "lora": [{"path": str(p.resolve()), "scale": s, "sha256": file_digest(p)} for p, s in loras],
        "negative_prompt": args.negative_prompt,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "sampler": args.sampler,
        "seed": args.seed,
        "height": args.height,
        "width": args.width,
        "dtype": args.dtype,
        "min_clip_score": args.min_clip_score,
        "clip_model": str(Path(args.clip_model).expanduser().resolve()) if args.clip_model else None,
    }


# Settings added later, with the value older folders were made with.
_ADDED = {"dtype": "float32", "min_clip_score": None, "clip_model": None}


def _adapter_ids(lora: list) -> list[tuple[str, float]] | None:
    """(sha256, scale) of each adapter; None for a folder written when adapters were recorded by path."""
    if all(isinstance(a, dict) and "sha256" in a for a in lora):
        return [(a["sha256"], a["scale"]) for a in lora]
    return None


def _adapter_diff(old: list, new: list) -> list[str]:
    def show(a):
        return f"{a['path']} (sha256 {a['sha256'][:12]}, scale {a['scale']:g})" if a else "none"

    lines = []
    for i in range(max(len(old), len(new))):
        a, b = (old[i] if i < len(old) else None), (new[i] if i < len(new) else None)
        if a and b and (a["sha256"], a["scale"]) == (b["sha256"], b["scale"]):
            continue
        same_file = a and b and a["path"] == b["path"] and a["sha256"] != b["sha256"]
        lines.append(f"lora {i + 1}: {show(a)} -> {show(b)}"
                     + (": the file changed since these images were made (retrained?)" if same_file else ""))
    return lines


def check_settings(out: Path, settings: dict) -> None:
    path = out / SETTINGS_FILE
    if path.exists() and (any((out / "images").glob("*.png")) or any((out / REJECTED_DIR).glob("*.png"))):
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise GenerateError(f"{path}: invalid JSON ({e}); it records the settings of the images in {out}: "
                                "restore it, or use another --output_dir") from None
        old_lora = old.get("lora", [])
        if old_lora and _adapter_ids(old_lora) is None:
            raise GenerateError(
                f"{out} holds images made with the adapter(s) {', '.join(str(a[0]) for a in old_lora)}, recorded "
                "by path only: whether the file(s) there are still the ones that made them cannot be told. If "
                f"they are, delete {path} and re-run to resume; otherwise use another --output_dir.")
        diff = [f"{k}: {old.get(k, _ADDED.get(k))!r} -> {v!r}" for k, v in settings.items()
                if k != "lora" and old.get(k, _ADDED.get(k)) != v]
        lora = _adapter_diff(old_lora, settings["lora"]) if _adapter_ids(old_lora) != _adapter_ids(
            settings["lora"]) else []
        if lora:
            raise GenerateError(
                f"{out} holds images of another adapter:\n  " + "\n  ".join(lora + diff)
                + "\nImages of two adapters would mix in one dataset: use another --output_dir for this adapter, "
                "or give the adapter that made these images to resume.")
        if diff:
            raise GenerateError(
                f"{out} holds images made with other settings:\n  " + "\n  ".join(diff)
                + "\nRe-run with the old settings to resume, or use another --output_dir.")


def check_foreign_images(out: Path, existing: dict[str, dict]) -> None:
    """Refuse a folder holding images this tool did not make and does not list: train.py reads captions.json
    before caption files or metadata.jsonl, so writing one would leave those images out of training."""
    foreign = [p for folder in (out, out / "images") if folder.is_dir() for p in sorted(folder.iterdir())
               if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
               and not (folder == out / "images" and (p.name in existing or _GENERATED.fullmatch(p.name)))]
    if foreign:
        names = ", ".join(str(p.relative_to(out)) for p in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise GenerateError(
            f"--output_dir {out} holds {len(foreign)} image(s) that mlx-sd-generate did not make and "
            f"{CAPTIONS_FILE} does not list ({names}): writing {CAPTIONS_FILE} there would make train.py read "
            "the generated images only and drop those. Generate into another folder; or, to add generated "
            f"images to this dataset, first list its images in images/ and in {out / CAPTIONS_FILE} "
            '(records {"file_name": ..., "text": ...}).')


def check_prompts(out: Path, existing: dict[str, dict], jobs: list[Job]) -> None:
    wrong = [f"{j.name}: {existing[j.name]['text']!r} (now {j.prompt!r})"
             for j in jobs if j.name in existing and existing[j.name]["text"] != j.prompt]
    if wrong:
        raise GenerateError(f"{out}: {len(wrong)} existing image(s) were made from other prompts, e.g.\n  "
                            + "\n  ".join(wrong[:5]) + "\nUse the same prompts (same order) to resume, "
                            "or another --output_dir.")


def parameters(job: Job, args) -> str:
    """A1111-style text, so other tools show how the image was made."""
    return (f"{job.prompt}\nNegative prompt: {args.negative_prompt}\n"
            f"Steps: {args.steps}, Sampler: {args.sampler}, CFG scale: {args.guidance_scale}, "
            f"Seed: {job.seed}, Size: {args.width}x{args.height}, Model: {args.model}"
            + (f", Dtype: {args.dtype}" if args.dtype != "float32" else "")
            + "".join(f", Lora: {spec}" for spec in args.lora))


def prepare(args, out: Path, jobs: list[Job], settings: dict) -> tuple[dict[str, dict], set[str]]:
    """Rank 0: check the output folder; returns (captions records, names already done)."""
    if out.exists() and not out.is_dir() or (out / "images").exists() and not (out / "images").is_dir():
        raise GenerateError(f"--output_dir {out}: a file is in the way; the output must be a folder path")
    existing = read_captions(out)
    check_foreign_images(out, existing)
    check_prompts(out, existing, jobs)
    check_settings(out, settings)
    done = {j.name for j in jobs if is_done(out, j.name)}
    captions = dict(existing)
    captions.update({j.name: {**record(j), **existing.get(j.name, {})} for j in jobs if j.name in done})
    return captions, done
