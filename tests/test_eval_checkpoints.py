"""`mlx-sd-eval checkpoints` on a real (tiny) training run: the run's own settings, CLIP score in
generation mode, and every input error stopped before any image is generated or featurised.

Also `compare`'s checks before work and notes of every model, and train.py's unreadable
`--validation_prompts` file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_metrics_models import smooth_images
from test_training import make_dataset

import train
from mlx_sd import evaluate
from mlx_sd import generate as gen
from mlx_sd.metrics.cli import main as eval_main
from mlx_sd.metrics.features import FeatureModel, folder_features
from mlx_sd.metrics.images import list_images
from mlx_sd.metrics.scores import clip_scores

PROMPTS = ["black shoes on white", "white sneakers"]


@pytest.fixture(scope="module")
def feature_models(tmp_path_factory):
    from mlx_sd.metrics.tiny import make_tiny_feature_models

    return make_tiny_feature_models(tmp_path_factory.mktemp("feature-models"))


@pytest.fixture(scope="module")
def run(tiny_mlx_dir, tmp_path_factory):
    """A 2-step run with a checkpoint and validation images at steps 1 and 2, on its own prompts."""
    root = tmp_path_factory.mktemp("evalrun")
    data = make_dataset(root / "data", n=4, size=64)
    out = root / "run"
    argv = ["--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", data, "--output_dir", out,
            "--resolution", 64, "--train_batch_size", 2, "--lr_warmup_steps", 0, "--lr_scheduler", "constant",
            "--seed", 5, "--max_train_steps", 2, "--checkpointing_steps", 1, "--validation_steps", 1,
            "--num_validation_images", 1, "--validation_inference_steps", 2, "--validation_sampler", "ddim",
            "--validation_guidance_scale", 3.0, "--validation_prompts", *PROMPTS, "--no_progress"]
    assert train.main([str(a) for a in argv]) == 0
    return out


@pytest.fixture
def generate_calls(monkeypatch):
    """mlx-sd-generate as the command runs it, with every argv recorded."""
    calls = []
    real = gen.main

    def spy(argv):
        calls.append(gen.build_parser().parse_args(argv))
        return real(argv)

    monkeypatch.setattr(gen, "main", spy)
    return calls


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if anything is generated or any feature computed."""
    def refuse(*a, **k):
        raise AssertionError("work started before the input was checked")

    monkeypatch.setattr(gen, "main", refuse)
    monkeypatch.setattr(evaluate, "folder_features", refuse)


def _clip_scores_of(folder: Path, captions: dict[str, str], clip: FeatureModel) -> float:
    images = list_images(folder)
    feats = folder_features(clip, images, cache=False, progress=False)
    text = clip.text_features([captions[p.name] for p in feats.paths])
    return max(float(clip_scores(feats.features, text).mean()), 0.0)


def test_generation_uses_the_runs_settings_and_scores_clip(run, tiny_mlx_dir, feature_models, generate_calls,
                                                           tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLX_SD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "eval"
    assert eval_main(["checkpoints", str(run), "--clip", str(feature_models["clip"]), "--output_dir", str(out)]) == 0
    # the run's model, prompts, size, seed, sampler, guidance, steps and image count; nothing of the Hub default
    assert [c.lora for c in generate_calls] == [[str(run / "checkpoints" / f"checkpoint-{s}")] for s in (1, 2)]
    settings = {(c.model, tuple(c.prompt), c.height, c.width, c.seed, c.sampler, c.guidance_scale, c.steps,
                 c.num_images_per_prompt) for c in generate_calls}
    assert settings == {(str(tiny_mlx_dir), tuple(PROMPTS), 64, 64, 5, "ddim", 3.0, 2, 1)}
    res = json.loads((out / "checkpoints.json").read_text())
    assert res["prompts"] == PROMPTS and res["select"] == "clip_score"
    assert [r["step"] for r in res["rows"]] == [1, 2]
    clip = FeatureModel.load(feature_models["clip"])
    for r in res["rows"]:  # the captions generate wrote (a list of records) reach the CLIP score
        folder = out / f"checkpoint-{r['step']}"
        names = {rec["file_name"]: rec["text"] for rec in json.loads((folder / "captions.json").read_text())}
        assert set(names.values()) == set(PROMPTS)
        assert r["clip_score"] == pytest.approx(_clip_scores_of(folder, names, clip), rel=1e-6)
    printed = capsys.readouterr().out
    assert "best checkpoint by CLIP score" in printed and "2 prompts from" in printed


def test_flags_override_the_runs_settings(run, feature_models, generate_calls, tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_SD_CACHE", str(tmp_path / "cache"))
    assert eval_main(["checkpoints", str(run), "--clip", str(feature_models["clip"]), "--output_dir",
                      str(tmp_path / "eval"), "--prompt", "blue shoes", "--seed", "11", "--steps", "1",
                      "--sampler", "euler", "--num_images_per_prompt", "2"]) == 0
    assert {(tuple(c.prompt), c.seed, c.steps, c.sampler, c.num_images_per_prompt, c.height) for c in generate_calls} \
        == {(("blue shoes",), 11, 1, "euler", 2, 64)}


def test_validation_images_are_scored_with_the_runs_prompts(run, feature_models, tmp_path, monkeypatch):
    import mlx_sd.metrics.cli as cli

    monkeypatch.setenv("MLX_SD_CACHE", str(tmp_path / "cache"))
    seen = []
    real_evaluate_set = cli.evaluate_set

    def spy(images, captions, *a, **k):
        seen.append({p.name: t for p, t in captions.items()})
        return real_evaluate_set(images, captions, *a, **k)

    monkeypatch.setattr(cli, "evaluate_set", spy)
    out = tmp_path / "eval"
    assert eval_main(["checkpoints", str(run), "--from_validation", "--clip", str(feature_models["clip"]),
                      "--output_dir", str(out)]) == 0
    res = json.loads((out / "checkpoints.json").read_text())
    assert res["prompts"] == PROMPTS
    clip = FeatureModel.load(feature_models["clip"])
    steps = evaluate.validation_sets(run / "validation")
    assert sorted(steps) == [r["step"] for r in res["rows"]] == [1, 2]
    # every validation image is scored against the prompt the run rendered it from
    assert seen == [{p.name: PROMPTS[i] for p, i in steps[s]} for s in (1, 2)] and all(len(c) == 2 for c in seen)
    for r in res["rows"]:
        want_dir = tmp_path / f"step{r['step']}"
        want_dir.mkdir()
        captions = {}
        for p, i in steps[r["step"]]:
            (want_dir / p.name).write_bytes(p.read_bytes())
            captions[p.name] = PROMPTS[i]
        assert r["clip_score"] == pytest.approx(_clip_scores_of(want_dir, captions, clip), rel=1e-6)


def _copy_run(run: Path, dst: Path, prompts=None) -> Path:
    import shutil

    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("eval"))
    if prompts is not None:
        for cfg in dst.glob("logs/*/config.json"):
            c = json.loads(cfg.read_text())
            cfg.write_text(json.dumps({**c, "validation_prompts": prompts}))
    return dst


@pytest.mark.parametrize("case", ["inception without --real", "select fid without inception", "scipy missing",
                                  "one image per set", "prompt index beyond the prompts",
                                  "unreadable prompts file", "no settings and no --model"])
def test_checkpoints_input_errors_stop_before_any_work(case, run, feature_models, tmp_path, no_work, monkeypatch,
                                                       capsys):
    clip = ["--clip", str(feature_models["clip"])]
    real = tmp_path / "real"
    for i, im in enumerate(smooth_images(3, 32, 32, seed=1)):
        real.mkdir(exist_ok=True)
        Image.fromarray(im).save(real / f"{i}.png")
    argv, expect = {
        "inception without --real": (["--inception", str(feature_models["inception"]), *clip],
                                     "--inception compares against reference images: give --real"),
        "select fid without inception": (["--real", str(real), *clip, "--select", "fid"],
                                         "--select fid: not computed"),
        "scipy missing": (["--real", str(real), *clip], "need scipy"),
        "one image per set": (["--real", str(real), *clip, "--prompt", "one", "--num_images_per_prompt", "1"],
                              "at least 2 images per set: checkpoint-1 has 1"),
        "prompt index beyond the prompts": (["--from_validation", *clip, "--prompt", "only one"],
                                            "images of prompt 1 but only 1 prompts"),
        "unreadable prompts file": ([*clip], "missing.txt: cannot read it"),
        "no settings and no --model": ([*clip], "give --model"),
    }[case]
    folder = run
    if case == "scipy missing":
        monkeypatch.setitem(sys.modules, "scipy", None)
    if case == "unreadable prompts file":
        folder = _copy_run(run, tmp_path / "copy", prompts=[str(tmp_path / "missing.txt")])
    if case == "no settings and no --model":
        folder = _copy_run(run, tmp_path / "copy")
        for p in [*folder.glob("logs/*/config.json"), *folder.glob("checkpoints/*/trainer_state.json")]:
            p.write_text("{}")
    assert eval_main(["checkpoints", str(folder), "--output_dir", str(tmp_path / "eval"), *argv]) == 2
    err = capsys.readouterr().err
    assert expect in err and len(err.strip().splitlines()) == 1, err


def test_compare_checks_before_work(feature_models, tmp_path, no_work, monkeypatch, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, n in ((a, 3), (b, 1)):
        folder.mkdir()
        for i, im in enumerate(smooth_images(n, 32, 32, seed=n)):
            Image.fromarray(im).save(folder / f"{i}.png")
    assert eval_main(["compare", str(a), str(b), "--clip", str(feature_models["clip"])]) == 2
    assert f"at least 2 images per set: {b} has 1" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "scipy", None)
    assert eval_main(["compare", str(a), str(a), "--clip", str(feature_models["clip"])]) == 2
    assert "need scipy" in capsys.readouterr().err


def test_compare_keeps_every_models_notes_and_counts(feature_models, tmp_path):
    real, generated = tmp_path / "real", tmp_path / "gen"
    for folder, n, seed in ((real, 4, 1), (generated, 3, 2)):
        folder.mkdir()
        for i, im in enumerate(smooth_images(n, 32, 32, seed=seed)):
            Image.fromarray(im).save(folder / f"{i}.png")
    models = [FeatureModel.load(feature_models[k]) for k in ("dinov2", "clip")]
    res = evaluate.compare_folders(real, generated, models, cache=False, progress=False)
    assert res["n_real"] == 4 and res["n_generated"] == 3
    assert res["counts"] == {"dinov2": {"real": 4, "generated": 3}, "clip": {"real": 4, "generated": 3}}
    for kind in ("dinov2", "clip"):
        assert any(n.startswith(f"{kind}: 3 images <") for n in res["notes"]), res["notes"]
        assert any(n.startswith(f"{kind}: the sets differ in size") for n in res["notes"]), res["notes"]
    assert np.isfinite(res["fd_dinov2"]) and np.isfinite(res["fd_clip"])


def test_clip_score_help_lists_only_what_it_uses(capsys):
    with pytest.raises(SystemExit):
        eval_main(["clip-score", "--help"])
    text = capsys.readouterr().out
    assert "--clip" in text and not any(f in text for f in ("--inception", "--dinov2", "--kid_subset"))


@pytest.mark.parametrize("extra", [[], ["--no_validation"]])
def test_train_refuses_an_unreadable_prompts_file_before_work(extra, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(["--train_data_dir", str(tmp_path / "data"), "--output_dir", str(out),
                    "--validation_prompts", str(tmp_path / "missing.txt"), *extra])
    assert e.value.code == 2 and not out.exists()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--validation_prompts" in last and "missing.txt: cannot read it" in last
