"""Checkpoints, exact resume, interruption, validation images and the setup check."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import train
from lora.formats import load_adapter
from mlx_sd.checkpoint import latest_checkpoint, list_checkpoints
from test_training import ROOT, make_dataset, run_train

COMMON = ["--resolution", 128, "--train_batch_size", 2, "--gradient_accumulation_steps", 2, "--random_flip",
          "--lr_scheduler", "cosine", "--lr_warmup_steps", 2, "--learning_rate", 1e-3, "--lora_dropout", 0.1,
          "--no_validation", "--seed", 11]


def _cmd(*args):
    return [sys.executable, str(ROOT / "train.py"), *map(str, args), "--no_progress"]


def _metrics(out: Path) -> dict[int, dict]:
    recs = {}
    for d in sorted((out / "logs").iterdir()):
        for line in (d / "metrics.jsonl").read_text().splitlines() if (d / "metrics.jsonl").exists() else []:
            r = json.loads(line)
            recs[r["step"]] = r
    return recs


def _weights(out: Path):
    a = load_adapter(out / "lora_weights")
    return {k: np.array(a.A[k]) for k in a.A}, {k: np.array(a.B[k]) for k in a.B}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("resume") / "data", n=6)


@pytest.fixture(scope="module")
def straight(tiny_mlx_dir, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    assert run_train("--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", dataset, "--output_dir", out,
                     "--max_train_steps", 8, "--checkpointing_steps", 4, *COMMON) == 0
    return out


# Bit-identical comparisons below hold because every run here uses the same BLAS thread count:
# the subprocesses inherit this process's environment (OpenBLAS sums in an order that depends on
# its thread count). Runs with another split of the batch are compared within a tolerance.
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_run_resumes_exactly(sig, straight, tiny_mlx_dir, dataset, tmp_path):
    out = tmp_path / "run"
    args = ["--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", dataset, "--output_dir", out,
            "--max_train_steps", 8, "--checkpointing_steps", 4, *COMMON]
    proc = subprocess.Popen(_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "checkpoint-4").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()  # the signal must land on a running training
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err
        assert "resume with --resume_from_checkpoint latest" in err
    stopped_at = int(latest_checkpoint(out / "checkpoints").name.split("-")[1])
    assert stopped_at >= 4
    assert run_train(*args, "--resume_from_checkpoint", "latest") == 0
    a, b = _weights(straight), _weights(out)
    for k in a[0]:
        assert np.array_equal(a[0][k], b[0][k]) and np.array_equal(a[1][k], b[1][k]), k  # bit-identical
    ref, got = _metrics(straight), _metrics(out)
    assert sorted(got) == list(range(1, 9))
    for s in range(1, 9):
        assert got[s]["lr"] == ref[s]["lr"] and got[s]["loss"] == ref[s]["loss"], s


def test_resume_from_a_copied_checkpoint_folder(straight, tiny_mlx_dir, dataset, tmp_path):
    """A checkpoint is self-contained: copied elsewhere it continues the same run."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(straight / "checkpoints" / "checkpoint-4", tmp_path / "ck4")
    assert run_train("--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", dataset, "--output_dir", out,
                     "--max_train_steps", 8, "--checkpointing_steps", 4, *COMMON,
                     "--resume_from_checkpoint", tmp_path / "ck4") == 0
    a, b = _weights(straight), _weights(out)
    assert all(np.array_equal(a[0][k], b[0][k]) and np.array_equal(a[1][k], b[1][k]) for k in a[0])


def test_checkpoint_of_another_run_is_refused(straight, tiny_mlx_dir, dataset, tmp_path, capsys):
    rc = run_train("--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", dataset, "--output_dir",
                   tmp_path,
                   "--max_train_steps", 8, *[("--lora_rank" if a == "--lora_rank" else a) for a in COMMON],
                   "--lora_rank", 4, "--resume_from_checkpoint", straight / "checkpoints" / "checkpoint-4")
    assert rc == 2
    err = capsys.readouterr().err
    assert "different run" in err and "lora_rank: checkpoint 8 vs now 4" in err
    rc = run_train("--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", dataset, "--output_dir",
                   tmp_path,
                   "--max_train_steps", 8, *COMMON, "--gradient_accumulation_steps", 1,
                   "--resume_from_checkpoint", straight / "checkpoints" / "checkpoint-4")
    assert rc == 2  # 2 x 1 images per update instead of 2 x 2
    assert "global_batch: checkpoint 4 vs now 2" in capsys.readouterr().err


def test_resume_with_another_split_of_the_global_batch(straight, tiny_mlx_dir, dataset, tmp_path):
    """The checkpoint of batch 2 x accumulation 2 continues at batch 1 x accumulation 4 (4 images per
    update either way): every sample keeps its place and its draws, so the run ends with the straight
    run's adapter within 1e-5 relative L2 (the sums run in another order, hence not bit-identical)."""
    out = tmp_path / "run"
    assert run_train("--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", dataset, "--output_dir", out,
                     "--max_train_steps", 8, "--checkpointing_steps", 4, *COMMON, "--train_batch_size", 1,
                     "--gradient_accumulation_steps", 4,
                     "--resume_from_checkpoint", straight / "checkpoints" / "checkpoint-4") == 0
    a, b = _weights(straight), _weights(out)
    for i, what in enumerate("AB"):
        x = np.concatenate([a[i][k].ravel() for k in sorted(a[i])])
        y = np.concatenate([b[i][k].ravel() for k in sorted(a[i])])
        rel = np.linalg.norm(x - y) / np.linalg.norm(x)
        print(f"resumed at batch 1 x 4 vs straight batch 2 x 2: {what} relative L2 {rel:.2e}")
        assert rel <= 1e-5
    ref, got = _metrics(straight), _metrics(out)
    np.testing.assert_allclose([got[s]["loss"] for s in range(5, 9)], [ref[s]["loss"] for s in range(5, 9)], rtol=1e-5)


def test_pruning_keeps_the_newest(tiny_mlx_dir, dataset, tmp_path):
    assert run_train("--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", dataset, "--output_dir",
                     tmp_path,
                     "--max_train_steps", 5, "--checkpointing_steps", 1, "--checkpoints_total_limit", 2, *COMMON) == 0
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [4, 5]


KILL_LOOP = r"""
import mlx_sd, sys, mlx.core as mx
from pathlib import Path
from lora import LoRAConfig, inject_lora
from mlx_sd.model_folder import ModelFolder
from mlx_sd.checkpoint import save_checkpoint
from mlx_sd.training import make_optimizer
unet = ModelFolder(sys.argv[1]).unet()
inject_lora(unet, LoRAConfig(r=4, alpha=8))
opt = make_optimizer(1e-3, "constant", 0, 10)
opt.init(unet.trainable_parameters())
step = 0
while True:
    step += 1
    save_checkpoint(Path(sys.argv[2]), step, unet, opt, {"step": step, "config": {"model": "x"}}, total_limit=3)
    print(step, flush=True)
"""


def test_kill_during_checkpoint_write_leaves_only_complete_ones(tiny_mlx_dir, tmp_path):
    root = tmp_path / "checkpoints"
    rng = np.random.default_rng(0)
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", KILL_LOOP, str(tiny_mlx_dir), str(root)],
                                stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one save done: now kill at a random point of a later one
        time.sleep(float(rng.uniform(0.0, 0.3)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        found = list_checkpoints(root)
        assert found
        for step, path in found:
            assert json.loads((path / "trainer_state.json").read_text())["step"] == step
            assert load_adapter(path).A  # adapter readable
            assert mx.load(str(path / "optimizer.safetensors"))
        assert latest_checkpoint(root) == found[-1][1]
    # Leftovers of killed saves never count as checkpoints, even with a state file in them.
    leftover = root / ".checkpoint-99.tmp-elsewhere-1"
    leftover.mkdir()
    (leftover / "trainer_state.json").write_text('{"step": 99}')
    assert 99 not in [s for s, _ in list_checkpoints(root)]


def test_non_finite_loss_stops_with_the_step_and_keeps_last_checkpoint(tiny_mlx_dir, dataset, tmp_path, monkeypatch,
                                                                       capsys):
    real = train.TrainStep

    class NanAtThird(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            inner, calls = self.grad_step, [0]

            def grad_step(mean, std, ctx, keys, acc):
                calls[0] += 1
                loss, acc = inner(mean, std, ctx, keys, acc)
                return (loss * float("nan"), acc) if calls[0] == 5 else (loss, acc)  # step 3, micro-batch 1
            self.grad_step = grad_step

    monkeypatch.setattr(train, "TrainStep", NanAtThird)
    rc = run_train("--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", dataset, "--output_dir",
                   tmp_path,
                   "--max_train_steps", 6, "--checkpointing_steps", 2, *COMMON)
    assert rc == 1
    err = capsys.readouterr().err
    assert "step 3: loss is nan" in err and "checkpoint-2" in err
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [2]

    rc = run_train("--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", dataset, "--output_dir",
                   tmp_path / "skip",
                   "--max_train_steps", 4, "--skip_nan_steps", *COMMON, "--checkpointing_steps", 3)
    assert rc == 0
    assert "1 update(s) skipped" in capsys.readouterr().out
    # the skipped step is still a step: its checkpoint is written
    assert [s for s, _ in list_checkpoints(tmp_path / "skip" / "checkpoints")] == [3, 4]
    steps = [json.loads(line)["step"] for line in next((tmp_path / "skip" / "logs").iterdir()).joinpath(
        "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 4]  # no record for the skipped update


def test_validation_images_at_the_right_steps(tiny_mlx_dir, dataset, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("black casual shoes\n\nblue sneakers on white\n")
    assert run_train("--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", dataset, "--output_dir",
                     tmp_path,
                     "--max_train_steps", 5, "--validation_steps", 2, "--validation_prompts", prompts,
                     "--num_validation_images", 2, "--validation_inference_steps", 2, "--resolution", 128,
                     "--train_batch_size", 2, "--lr_warmup_steps", 0, "--seed", 1) == 0
    names = sorted(p.name for p in (tmp_path / "validation").iterdir())
    # 6 images / batch 2 = 3 micro-batches per epoch: steps 2, 4 are in epochs 0, 1; the final (5) in epoch 1.
    want = []
    for e, s in ((0, 2), (1, 4), (1, 5)):
        want += [f"epoch{e:03d}_step{s:04d}_prompt{p}_img{i}.png" for p in (0, 1) for i in (0, 1)]
        want.append(f"epoch{e:03d}_step{s:04d}_grid.png")
    assert names == sorted(want)
    from PIL import Image

    im = Image.open(tmp_path / "validation" / "epoch000_step0002_prompt0_img0.png")
    assert im.size == (128, 128)
    grid = Image.open(tmp_path / "validation" / "epoch000_step0002_grid.png")
    assert grid.size == (256, 256)


def test_check_command(tiny_mlx_dir, dataset, tmp_path):
    ok = subprocess.run(_cmd("--check", "--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", dataset,
                             "--output_dir", tmp_path / "o", *COMMON), capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    for line in ("trainable parameters: 104,960", "(finite)", "BLAS:", "peak memory (MLX):", "time per update:",
                 "estimated run:", "check passed"):
        assert line in ok.stdout, line
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "captions.json").write_text(json.dumps({"gone.png": "a shoe"}))
    bad = subprocess.run(_cmd("--check", "--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", empty,
                              "--output_dir", tmp_path / "o2"), capture_output=True, text=True)
    assert bad.returncode != 0 and "no usable images" in bad.stderr and "gone.png: file not found" in bad.stderr
    missing = subprocess.run(_cmd("--check", "--pretrained_model_name_or_path", tmp_path / "no-such-model",
                                  "--train_data_dir", dataset, "--output_dir", tmp_path / "o3"),
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "no-such-model" in missing.stderr
    assert "Traceback" not in bad.stderr + missing.stderr


def test_random_crops_resume_exactly(tiny_mlx_dir, dataset, tmp_path):
    """--no-center_crop (uncached): crops are drawn per (seed, micro-batch, position), so a run
    resumed from the step-2 checkpoint ends bit-identical to the straight run, and the crops are
    not the center crops."""
    import shutil

    common = ["--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", dataset, "--no_cache",
              "--checkpointing_steps", 2, *COMMON]
    straight, resumed, centered = tmp_path / "straight", tmp_path / "resumed", tmp_path / "centered"
    assert run_train(*common, "--no-center_crop", "--output_dir", straight, "--max_train_steps", 4) == 0
    shutil.copytree(straight / "checkpoints" / "checkpoint-2", tmp_path / "ck2")
    assert run_train(*common, "--no-center_crop", "--output_dir", resumed, "--max_train_steps", 4,
                     "--resume_from_checkpoint", tmp_path / "ck2") == 0
    assert run_train(*common, "--output_dir", centered, "--max_train_steps", 4) == 0
    a, b = _weights(straight), _weights(resumed)
    assert all(np.array_equal(a[0][k], b[0][k]) and np.array_equal(a[1][k], b[1][k]) for k in a[0])
    crop, center = _metrics(straight), _metrics(centered)
    assert [crop[s]["loss"] for s in (3, 4)] == [_metrics(resumed)[s]["loss"] for s in (3, 4)]
    assert any(crop[s]["loss"] != center[s]["loss"] for s in range(1, 5))
