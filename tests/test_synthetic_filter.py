"""mlx-sd-generate --clip_model / --min_clip_score: scores recorded, low-scoring images set aside.

Scores are checked against transformers' CLIPModel on the saved PNGs (CLIPImageProcessor, CLIP
tokenizer): 100 x cosine of get_image_features and get_text_features, within 2e-3 absolute (the
records keep 4 decimals; the embeddings agree to 1e-4 relative, tests/test_metrics_models.py).
"""

import json

import mlx_sd  # noqa: F401, I001  (fast BLAS before mlx.core)

import numpy as np
import pytest
from metrics_reference import make_tiny_clip
from PIL import Image

from convert.feature_models import convert_feature_model
from mlx_sd import generate as gen
from mlx_sd.data import read_captions

torch = pytest.importorskip("torch")

PROMPTS = ["a photo of black casual shoes", "white sneakers on white background"]
FAST = ["--steps", "2", "--height", "64", "--width", "64", "--seed", "5", "--num_images_per_prompt", "4",
        "--batch_size", "3"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    src = tmp_path_factory.mktemp("clip") / "hf"
    ref = make_tiny_clip(src)
    return ref, src, convert_feature_model("clip", src, src.parent / "mlx")


@pytest.fixture(scope="module")
def scored(tiny_mlx_dir, clip, tmp_path_factory):
    """A run that records scores and sets nothing aside."""
    out = tmp_path_factory.mktemp("scored") / "out"
    argv = ["--model", str(tiny_mlx_dir), "--output_dir", str(out), *FAST, "--clip_model", str(clip[2])]
    assert gen.main(argv + [x for p in PROMPTS for x in ("--prompt", p)]) == 0
    return out, json.loads((out / "captions.json").read_text())


def reference_scores(ref, src, folder, records) -> np.ndarray:
    from transformers import CLIPImageProcessorPil, CLIPTokenizer

    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    images = [np.asarray(Image.open(folder / r["file_name"]).convert("RGB")) for r in records]
    pixels = torch.from_numpy(proc(images=images, return_tensors="np")["pixel_values"])
    tokens = CLIPTokenizer.from_pretrained(src)([r["text"] for r in records], padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b = ref.get_image_features(pixel_values=pixels), ref.get_text_features(**tokens)
    a, b = (x if isinstance(x, torch.Tensor) else x.pooler_output for x in (a, b))
    a, b = (torch.nn.functional.normalize(x.double(), dim=-1) for x in (a, b))
    return 100 * (a * b).sum(-1).numpy()


def test_scores_are_recorded_and_match_transformers(scored, clip):
    out, records = scored
    assert len(records) == 8 and all("clip_score" in r for r in records)
    ours = np.array([r["clip_score"] for r in records])
    expected = reference_scores(clip[0], clip[1], out / "images", records)
    print("scores:", np.round(ours, 3), "max |diff| vs transformers:", np.abs(ours - expected).max())
    assert np.abs(ours - expected).max() <= 2e-3
    assert not (out / "rejected").exists()  # no threshold: nothing is set aside


def test_images_under_the_threshold_are_set_aside_and_resume_skips_them(tiny_mlx_dir, clip, scored, tmp_path,
                                                                          capsys):
    _, records = scored
    s = sorted(r["clip_score"] for r in records)
    threshold = (s[3] + s[4]) / 2  # half below, half above, away from rounding
    out = tmp_path / "filtered"
    argv = ["--model", str(tiny_mlx_dir), "--output_dir", str(out), *FAST, "--clip_model", str(clip[2]),
            "--min_clip_score", f"{threshold:.6f}"] + [x for p in PROMPTS for x in ("--prompt", p)]
    assert gen.main(argv) == 0
    printed = capsys.readouterr().out
    low = {r["file_name"] for r in records if r["clip_score"] < threshold}
    assert len(low) == 4
    assert {p.name for p in (out / "rejected").glob("*.png")} == low
    assert {p.name for p in (out / "images").glob("*.png")} == {r["file_name"] for r in records} - low
    rejected = json.loads((out / "rejected.json").read_text())
    assert {r["file_name"] for r in rejected} == low
    by_name = {r["file_name"]: r for r in records}
    assert all(abs(r["clip_score"] - by_name[r["file_name"]]["clip_score"]) < 1e-3 and r["clip_score"] < threshold
               for r in rejected)  # the same seeds make the same images, so the same scores
    _, kept = read_captions(out)  # what train.py reads: the kept images only
    assert sorted(n for n, _ in kept) == sorted(set(by_name) - low)
    assert "set aside" in printed and f"{'kept':10} {4:7d}" in printed and f"{'set aside':10} {4:7d}" in printed

    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert gen.main(argv) == 0  # resumed: rejected images count as made
    assert "nothing to do" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == mtimes

    assert gen.main(argv + ["--min_clip_score", "0"]) == 2  # another threshold (the last flag wins): refused
    assert "min_clip_score" in capsys.readouterr().err


def test_filter_errors(tiny_mlx_dir, tmp_path, capsys):
    base = ["--model", str(tiny_mlx_dir), "--output_dir", str(tmp_path / "o"), "--prompt", "x", *FAST]
    with pytest.raises(SystemExit):
        gen.main(base + ["--min_clip_score", "25"])
    assert "--min_clip_score needs --clip_model" in capsys.readouterr().err
    assert gen.main(base + ["--clip_model", str(tmp_path / "missing"), "--min_clip_score", "25"]) == 2
    err = capsys.readouterr().err
    assert "--clip_model" in err and "convert --feature-model" in err
    assert not (tmp_path / "o" / "images").exists()  # refused before any image is made
