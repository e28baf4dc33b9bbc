"""Metrics vs the implementations users compare against, and `mlx-sd-eval` end to end.

FD vs pytorch-fid's `calculate_frechet_distance` (<= 1e-6 rel), KID vs torch-fidelity (<= 1e-4),
CLIP score vs torchmetrics' CLIPScore on a tiny CLIP (<= 1e-4), FID of two folders end to end vs
pytorch-fid with the same (seeded random) weights (<= 1e-3 rel).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from metrics_reference import fid_weights, make_tiny_clip, random_inception_state, reference_fid
from PIL import Image
from test_metrics_models import smooth_images

from convert.feature_models import convert_feature_model
from mlx_sd.metrics.cli import main as eval_main
from mlx_sd.evaluate import compare_folders, score_captions
from mlx_sd.metrics.features import FeatureModel, folder_features
from mlx_sd.metrics.images import list_images
from mlx_sd.metrics.scores import MetricError, clip_score, frechet_distance, gaussian_stats, kid

torch = pytest.importorskip("torch")


def features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return (rng.normal(size=(n, d)) @ mix + shift).astype(np.float32)


def write_images(folder, images, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / (names[i] if names else f"img{i:03d}.png"))
    return folder


# --- FD and KID on features ----------------------------------------------------------------------


def test_frechet_distance_matches_pytorch_fid():
    _, fid_score, *_ = reference_fid()
    a, b = features(300, 64, 0), features(400, 64, 1, shift=0.3)
    m1, s1 = gaussian_stats(a)
    m2, s2 = gaussian_stats(b)
    ref = fid_score.calculate_frechet_distance(np.mean(a, 0), np.cov(a, rowvar=False), np.mean(b, 0),
                                               np.cov(b, rowvar=False))
    ours = frechet_distance(m1, s1, m2, s2)
    print(f"FD vs pytorch-fid: {ours!r} vs {ref!r}, relative {abs(ours - ref) / abs(ref):.1e}")
    assert abs(ours - ref) <= 1e-6 * abs(ref)
    assert frechet_distance(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-6)


def test_kid_matches_torch_fidelity():
    _, _, metric_kid, _ = reference_fid()
    a, b = features(200, 64, 2), features(150, 64, 3, shift=0.2)
    ref = metric_kid.kid_features_to_metric(torch.from_numpy(a), torch.from_numpy(b), kid_subsets=20,
                                            kid_subset_size=100, verbose=False)
    ours = kid(a, b, subsets=20, subset_size=100)
    print(f"KID vs torch-fidelity: mean {ours['mean']!r} vs {ref['kernel_inception_distance_mean']!r}, "
          f"std {ours['std']!r} vs {ref['kernel_inception_distance_std']!r}")
    ref_mean = ref["kernel_inception_distance_mean"]
    assert abs(ours["mean"] - ref_mean) <= 1e-4 * abs(ref_mean)
    assert abs(ours["std"] - ref["kernel_inception_distance_std"]) <= 1e-4 * abs(ref["kernel_inception_distance_std"])


def test_kid_too_few_images_is_an_error_or_a_stated_reduction():
    a, b = features(40, 8, 0), features(30, 8, 1)
    with pytest.raises(MetricError, match="subset size 1000"):
        kid(a, b)
    assert kid(a, b, subsets=5, reduce_subset=True)["subset_size"] == 30


# --- CLIP score ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    src = tmp_path_factory.mktemp("clip") / "hf"
    ref = make_tiny_clip(src)
    return ref, src, convert_feature_model("clip", src, src.parent / "mlx")


def test_clip_score_matches_torchmetrics(tiny_clip, tmp_path):
    *_, CLIPScore = reference_fid()
    from transformers import CLIPImageProcessorPil, CLIPProcessor, CLIPTokenizer

    ref, src, out = tiny_clip

    class Features(torch.nn.Module):  # transformers 5 returns output objects where torchmetrics expects tensors
        def __init__(self, m):
            super().__init__()
            self.m, self.config = m, m.config

        def get_image_features(self, *a, **k):
            r = self.m.get_image_features(*a, **k)
            return r if isinstance(r, torch.Tensor) else r.pooler_output

        def get_text_features(self, *a, **k):
            r = self.m.get_text_features(*a, **k)
            return r if isinstance(r, torch.Tensor) else r.pooler_output

    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                                    crop_size={"height": 32, "width": 32}),
                              tokenizer=CLIPTokenizer.from_pretrained(src))
    metric = CLIPScore(model_name_or_path=lambda: (Features(ref), processor))
    images = smooth_images(4, 40, 57, seed=5)
    prompts = ["a photo of black shoes", "white sneakers", "brown leather casual shoes", "blue shoes on background"]
    expected = float(metric(list(torch.from_numpy(images).permute(0, 3, 1, 2)), prompts))
    write_images(tmp_path / "set" / "images", images)
    (tmp_path / "set" / "captions.json").write_text(json.dumps({f"img{i:03d}.png": p for i, p in enumerate(prompts)}))
    res = score_captions(tmp_path / "set", FeatureModel.load(out), cache=False, progress=False)
    print(f"CLIP score vs torchmetrics: {res['clip_score']!r} vs {expected!r}")
    assert abs(res["clip_score"] - expected) <= 1e-4 * abs(expected)
    assert set(res["per_prompt"]) == set(prompts) and res["n"] == 4


def test_clip_score_clamps_the_mean_at_zero():
    img = np.eye(3)
    assert clip_score(img, -img) == 0.0
    assert clip_score(img, img) == pytest.approx(100.0)


# --- FID of two folders, end to end ------------------------------------------------------------


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    state = random_inception_state(0)
    pth = tmp_path_factory.mktemp("inc") / "pt_inception-random.pth"
    torch.save(state, pth)
    return state, convert_feature_model("inception", pth, pth.parent / "mlx")


@pytest.mark.slow  # scipy's sqrtm of a 2048x2048 matrix, twice: ~20 s each on 2 free cores
def test_fid_of_two_folders_matches_pytorch_fid(inception, tmp_path):
    state, folder = inception
    _, fid_score, *_ = reference_fid()
    real = write_images(tmp_path / "real", smooth_images(6, 64, 64, seed=10))
    gen = write_images(tmp_path / "gen", smooth_images(6, 64, 64, seed=20))
    with fid_weights(state):
        ref = fid_score.calculate_fid_given_paths([str(real), str(gen)], batch_size=3, device="cpu", dims=2048,
                                                  num_workers=0)
    res = compare_folders(real, gen, [FeatureModel.load(folder)], kid_subset_size=1000, cache=False, progress=False)
    print(f"FID of two folders vs pytorch-fid: {res['fid']!r} vs {ref!r}, relative {abs(res['fid'] - ref) / ref:.1e}")
    assert abs(res["fid"] - ref) <= 1e-3 * abs(ref)
    assert res["kid_subset_size"] == 6 and any("KID subset size reduced" in n for n in res["notes"])
    assert any("not full rank" in n for n in res["notes"])


def test_cache_is_keyed_by_content_and_corrupt_images_are_skipped(inception, tmp_path):
    _, folder = inception
    model = FeatureModel.load(folder)
    a = write_images(tmp_path / "a", smooth_images(3, 40, 40, seed=1))
    (a / "broken.png").write_bytes(b"not a png")
    images = list_images(a)
    assert [p.name for p, _ in images.skipped] == ["broken.png"] and len(images.paths) == 3
    first = folder_features(model, images, cache_dir=tmp_path / "cache", progress=False)
    again = folder_features(model, list_images(a), cache_dir=tmp_path / "cache", progress=False)
    assert not first.cached and again.cached and np.array_equal(first.features, again.features)
    # renamed files: same content, same key; changed content: a new key
    b = write_images(tmp_path / "b", smooth_images(3, 40, 40, seed=1), names=["x.png", "y.png", "z.png"])
    assert folder_features(model, list_images(b), cache_dir=tmp_path / "cache", progress=False).cached
    write_images(b, smooth_images(1, 40, 40, seed=99), names=["x.png"])
    assert not folder_features(model, list_images(b), cache_dir=tmp_path / "cache", progress=False).cached


# --- the CLI -----------------------------------------------------------------------------------------


def test_eval_cli_compare_clip_score_and_validation_checkpoints(tiny_clip, tmp_path, capsys, monkeypatch):
    # FD-CLIP on the tiny CLIP's 24-d features keeps this fast; FID's path is the slow test above.
    monkeypatch.setenv("MLX_SD_CACHE", str(tmp_path / "cache"))
    _, _, clip = tiny_clip
    real = write_images(tmp_path / "real", smooth_images(5, 48, 48, seed=1))
    gen = write_images(tmp_path / "gen", smooth_images(5, 48, 48, seed=2))
    (gen / "captions.json").write_text(json.dumps({f"img{i:03d}.png": "a photo of shoes" for i in range(5)}))
    assert eval_main(["compare", str(real), str(gen), "--clip", str(clip), "--json", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "FD-CLIP" in out and "not full rank" in out
    res = json.loads((tmp_path / "c.json").read_text())
    assert res["fd_clip"] > 0 and res["n_real"] == 5

    assert eval_main(["clip-score", str(gen), "--clip", str(clip)]) == 0
    assert "a photo of shoes" in capsys.readouterr().out

    run = tmp_path / "run"
    for step, seed in ((500, 3), (1000, 4)):
        ims = smooth_images(4, 48, 48, seed=seed)
        write_images(run / "validation", ims, [f"epoch000_step{step:04d}_prompt{p}_img{i}.png"
                                               for p in range(2) for i in range(2)])
    assert eval_main(["checkpoints", str(run), "--from_validation", "--real", str(real), "--clip", str(clip),
                      "--prompt", "black shoes", "--prompt", "white sneakers", "--select", "fd_clip"]) == 0
    out = capsys.readouterr().out
    assert "best checkpoint by FD-CLIP" in out and "CLIP score" in out
    res = json.loads((run / "eval" / "checkpoints.json").read_text())
    assert [r["step"] for r in res["rows"]] == [500, 1000]
    assert all(0 <= r["clip_score"] <= 100 for r in res["rows"])
    assert res["best_step"] == min(res["rows"], key=lambda r: r["fd_clip"])["step"]
    assert (run / "eval" / "checkpoints.png").exists()


def test_eval_cli_errors_are_clear(tmp_path, capsys):
    assert eval_main(["compare", str(tmp_path / "nope"), str(tmp_path), "--inception", str(tmp_path)]) == 2
    assert "not a converted feature model" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "mlx_sd.json").write_text('{"feature_model": "clip"}')
    assert eval_main(["clip-score", str(tmp_path / "empty"), "--clip", str(tmp_path / "m")]) == 2
    assert "error:" in capsys.readouterr().err


def test_checkpoints_generates_each_with_the_same_seeds(tiny_clip, tmp_path, capsys, monkeypatch):
    """`checkpoints` without --from_validation: one generation per checkpoint, same prompts and seed."""
    import mlx_sd.generate

    monkeypatch.setenv("MLX_SD_CACHE", str(tmp_path / "cache"))
    _, _, clip = tiny_clip
    run = tmp_path / "run"
    for step in (10, 20):
        (run / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
        (run / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")  # a complete one
    calls = []

    def fake_generate(argv):
        args = mlx_sd.generate.build_parser().parse_args(argv)
        calls.append(args)
        out = __import__("pathlib").Path(args.output_dir)
        names = [f"prompt{p:05d}_img{i:03d}.png" for p in range(len(args.prompt))
                 for i in range(args.num_images_per_prompt)]
        write_images(out / "images", smooth_images(len(names), 32, 32, seed=len(calls)), names)
        (out / "captions.json").write_text(json.dumps(  # mlx-sd-generate's format: a list of records
            [{"file_name": n, "text": args.prompt[int(n[6:11])], "seed": args.seed} for n in names]))
        return 0

    monkeypatch.setattr(mlx_sd.generate, "main", fake_generate)
    assert eval_main(["checkpoints", str(run), "--model", "m", "--clip", str(clip), "--prompt", "black shoes",
                      "--num_images_per_prompt", "2", "--seed", "7", "--resolution", "64"]) == 0
    assert [c.lora[0] for c in calls] == [str(run / "checkpoints" / f"checkpoint-{s}") for s in (10, 20)]
    settings = {(c.seed, c.height, c.num_images_per_prompt, tuple(c.prompt)) for c in calls}
    assert settings == {(7, 64, 2, ("black shoes",))}
    out = capsys.readouterr().out
    assert "best checkpoint by CLIP score" in out
    res = json.loads((run / "eval" / "checkpoints.json").read_text())
    assert [r["step"] for r in res["rows"]] == [10, 20] and all(r["n"] == 2 for r in res["rows"])
    assert all(0 <= r["clip_score"] <= 100 for r in res["rows"])
