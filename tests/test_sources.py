"""Training data sources: kohya sidecar captions, metadata columns, Hub dataset repos, --max_train_samples.

The Hub test runs train.py in its own process against a Hugging Face cache laid out as
huggingface_hub writes it (refs/, snapshots/<commit>/), with HF_HUB_OFFLINE=1: the product's real
download call (`snapshot_download`) resolves the repo from the cache, nothing of the product mocked.
"""

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from test_training import make_dataset

from mlx_sd.data import DataError, read_captions, scan
from mlx_sd.sources import fetch_hub_dataset, subset

ROOT = Path(__file__).resolve().parent.parent


def sidecar_dataset(root: Path, ext: str = ".txt") -> Path:
    """make_dataset's images with a caption file beside each instead of captions.json."""
    data = make_dataset(root, n=4)
    caps = json.loads((data / "captions.json").read_text())
    (data / "captions.json").unlink()
    for name, text in caps.items():
        (data / "images" / name).with_suffix(ext).write_text(text + "\n")
    return data


def test_sidecar_captions_kohya_layout(tmp_path):
    data = sidecar_dataset(tmp_path / "d")
    imgs = data / "images"
    (imgs / "img01.txt").write_text("\n  first line wins  \nsecond line\n")
    Image.new("RGB", (64, 64), "white").save(imgs / "nocaption.jpg")
    Image.new("RGB", (64, 64), "white").save(imgs / "emptycaption.png")
    (imgs / "emptycaption.txt").write_text("  \n")
    folder, records = read_captions(data)
    assert folder == imgs
    assert dict(records)["img01.png"] == "first line wins" and dict(records)["nocaption.jpg"] is None
    good, problems = scan(data)
    assert sorted(s.path.name for s in good) == ["img00.png", "img01.png", "img02.png", "img03.png"]
    assert any(p.startswith("nocaption.jpg: no caption file") for p in problems)
    assert any(p.startswith("emptycaption.png: empty caption") for p in problems)
    with pytest.raises(DataError, match="no image with a .caption caption file"):
        read_captions(data, caption_extension="caption")


def test_caption_extension_picks_the_files(tmp_path):
    data = sidecar_dataset(tmp_path / "d", ext=".caption")
    for p in (data / "images").glob("*.caption"):  # decoys with another extension
        p.with_suffix(".txt").write_text("tags, wrong file")
    assert {c for _, c in read_captions(data)[1]} == {"tags, wrong file"}  # .txt is looked at first
    assert all(c.startswith("a product photo") for _, c in read_captions(data, caption_extension=".caption")[1])


def test_image_and_caption_columns(tmp_path):
    data = make_dataset(tmp_path / "d", n=3)
    caps = json.loads((data / "captions.json").read_text())
    (data / "captions.json").unlink()
    split = data / "train"  # a Hub imagefolder's split folder, images in a subfolder of it
    (data / "images").rename(tmp_path / "moved")
    (split / "pics").mkdir(parents=True)
    for name in caps:
        (tmp_path / "moved" / name).rename(split / "pics" / name)
    lines = [json.dumps({"path": f"pics/{f}", "text": "unused", "long_caption": c}) for f, c in caps.items()]
    (split / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    good, problems = scan(data, image_column="path", caption_column="long_caption")
    assert not problems and {s.path.name: s.caption for s in good} == caps
    with pytest.raises(DataError, match=r"no 'caption' column \(--caption_column\); keys present: path, text"):
        scan(data, image_column="path", caption_column="caption")
    with pytest.raises(DataError, match="check --image_column"):
        scan(data, image_column="img")


def test_max_train_samples_subset_is_seeded_and_ordered():
    items = list(range(50))
    a, b = subset(items, 10, seed=1), subset(items, 10, seed=1)
    assert a == b and a == sorted(a) and len(set(a)) == 10
    assert subset(items, 10, seed=2) != a
    assert subset(items, 80, seed=1) == items and subset(items, None, seed=1) == items


def hub_cache(cache: Path, repo: str, files: dict[str, bytes], commit: str, ref: str = "main") -> None:
    """A Hugging Face cache entry as huggingface_hub writes it (files stored directly, no blob links)."""
    store = cache / f"datasets--{repo.replace('/', '--')}"
    snap = store / "snapshots" / commit
    for rel, data in files.items():
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        (snap / rel).write_bytes(data)
    (store / "refs").mkdir(parents=True, exist_ok=True)
    (store / "refs" / ref).write_text(commit)


def imagefolder_files(tmp_path: Path, n: int = 5) -> dict[str, bytes]:
    data = make_dataset(tmp_path / "src", n=n)
    caps = json.loads((data / "captions.json").read_text())
    files = {f"train/{name}": (data / "images" / name).read_bytes() for name in caps}
    files["train/metadata.jsonl"] = "".join(json.dumps({"file_name": f, "text": c}) + "\n"
                                            for f, c in caps.items()).encode()
    files["README.md"] = b"---\nlicense: mit\n---\n"
    return files


def test_hub_dataset_trains_from_the_cache_offline(tiny_mlx_dir, tmp_path):
    cache = tmp_path / "hf"
    hub_cache(cache, "shoes-maker/casual-shoes", imagefolder_files(tmp_path), "a" * 40)
    hub_cache(cache, "shoes-maker/casual-shoes", imagefolder_files(tmp_path / "v2", n=3), "b" * 40, ref="v2")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "train.py"), "--pretrained_model_name_or_path", str(tiny_mlx_dir),
           "--dataset_name", "shoes-maker/casual-shoes", "--resolution", "64", "--train_batch_size", "2",
           "--max_train_steps", "1", "--no_validation", "--no_progress", "--lr_warmup_steps", "0"]
    r = subprocess.run(cmd + ["--output_dir", str(tmp_path / "run"), "--max_train_samples", "4"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "dataset: 5 images (0 skipped) from shoes-maker/casual-shoes" in r.stdout
    assert "--max_train_samples: training on 4 of them" in r.stdout
    assert (tmp_path / "run" / "lora_weights" / "lora_kohya.safetensors").is_file()

    r = subprocess.run(cmd + ["--output_dir", str(tmp_path / "run2"), "--dataset_revision", "v2"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "dataset: 3 images (0 skipped)" in r.stdout and f"snapshots{os.sep}{'b' * 40}" in r.stdout

    r = subprocess.run(cmd + ["--output_dir", str(tmp_path / "run3"), "--dataset_name", "nobody/nothing"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 2
    assert "--dataset_name nobody/nothing: not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in r.stderr


def test_the_offline_hint_names_what_is_set(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(*a, **k):
        raise LocalEntryNotFoundError("Cannot reach the Hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(DataError) as e:
        fetch_hub_dataset("someone/shoes")
    assert "the Hub cannot be reached (Cannot reach the Hub): connect once" in str(e.value)
    assert "HF_HUB_OFFLINE" not in str(e.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="HF_HUB_OFFLINE is set: unset it to download the dataset once"):
        fetch_hub_dataset("someone/shoes")


def test_hub_repo_without_images_is_refused(tmp_path, monkeypatch):
    cache = tmp_path / "hf"
    hub_cache(cache, "someone/parquet-only", {"data/train-00000.parquet": b"PAR1", "README.md": b"x"}, "c" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    with pytest.raises(DataError, match="the repo has no image files. Only imagefolder datasets"):
        fetch_hub_dataset("someone/parquet-only")
    with pytest.raises(DataError, match="expected a Hub dataset id"):
        fetch_hub_dataset("not-a-repo-id")


def test_data_source_flags_are_checked():
    import train

    with pytest.raises(SystemExit):
        train.parse_args([])
    with pytest.raises(SystemExit):
        train.parse_args(["--train_data_dir", "x", "--dataset_name", "a/b"])
    with pytest.raises(SystemExit):
        train.parse_args(["--train_data_dir", "x", "--dataset_revision", "v2"])
    assert train.parse_args(["--dataset_name", "a/b", "--max_train_samples", "3"]).max_train_samples == 3


CAPTION = "Café crème, Zürich, side view"


@pytest.mark.parametrize("bom,codec", [(b"", "utf-8"), (b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"),
                                       (b"\xfe\xff", "utf-16-be")])
def test_caption_files_are_decoded_by_their_byte_order_mark(tmp_path, bom, codec):
    folder = sidecar_dataset(tmp_path / "d")
    (folder / "images" / "img00.txt").write_bytes(bom + f"{CAPTION}\r\nsecond line\r\n".encode(codec))
    good, problems = scan(folder)
    assert not problems and {s.path.name: s.caption for s in good}["img00.png"] == CAPTION


@pytest.mark.parametrize("encoding,data,why", [
    ("latin-1", CAPTION.encode("latin-1"),
     r"not UTF-8 text \(byte 0xe9 at offset 3: another encoding, such as Latin-1\?\); save it as UTF-8"),
    ("utf-16 without BOM", CAPTION.encode("utf-16-le"), r"not text \(NUL bytes: UTF-16 without a byte-order mark"),
])
def test_caption_files_that_are_not_text_are_named(tmp_path, caplog, encoding, data, why):
    folder = sidecar_dataset(tmp_path / "d")
    bad = folder / "images" / "img02.txt"
    bad.write_bytes(data)
    good, problems = scan(folder)
    assert sorted(s.path.name for s in good) == ["img00.png", "img01.png", "img03.png"]
    assert len(problems) == 1 and re.match(f"img02.png: caption file unreadable: {re.escape(str(bad))}: {why}",
                                           problems[0]), problems
    assert "img02.png: caption file unreadable" in caplog.text  # logged as skipped
    with pytest.raises(DataError, match=f"--strict_data.*\n  img02.png: caption file unreadable: .*{why}"):
        scan(folder, strict=True)


def test_captions_json_with_a_bom_and_the_caption_files_it_shadows(tmp_path, caplog):
    folder = sidecar_dataset(tmp_path / "d")
    caps = {p.with_suffix(".png").name: p.read_text().strip() for p in (folder / "images").glob("*.txt")}
    (folder / "images" / "img00.txt").write_text("an older caption")
    del caps["img03.png"]
    (folder / "captions.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(caps).encode())
    good, problems = scan(folder)
    assert {s.path.name: s.caption for s in good} == caps
    assert problems == [f"img03.png: not listed in {folder / 'captions.json'} (add it there to train on it)"]
    assert (f"captions are read from {folder / 'captions.json'}; 4 .txt caption file(s) in {folder / 'images'} "
            "are not read") in caplog.text


def test_metadata_lines_are_located_once(tmp_path):
    folder = make_dataset(tmp_path / "d", n=2)
    caps = json.loads((folder / "captions.json").read_text())
    (folder / "captions.json").unlink()
    lines = [json.dumps({"file_name": f, "text": c}) for f, c in caps.items()] + ["", json.dumps({"txt": "x"})]
    (folder / "images" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        scan(folder)
    assert str(e.value) == (f"{folder / 'images' / 'metadata.jsonl'} line 4: no file name (one of file_name, image, "
                            "file, filename, path; keys present: txt)")


def test_image_types_that_are_not_read_are_named(tmp_path):
    folder = sidecar_dataset(tmp_path / "d")
    Image.new("RGB", (64, 64), "white").save(folder / "images" / "anim.gif")
    (folder / "images" / "anim.txt").write_text("a gif")
    good, problems = scan(folder)
    assert len(good) == 4
    assert problems == ["anim.gif: .gif files are not read as images (.png, .jpg, .jpeg, .webp, .bmp, .tif, .tiff); "
                        "convert it to PNG to train on it"]
