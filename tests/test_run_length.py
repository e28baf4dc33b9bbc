"""Training longer: a finished run continues to more steps in its own folder, its LR schedule rebuilt
for the new length as diffusers' training scripts rebuild theirs (`get_scheduler` with the new total,
stepped to the checkpoint's step)."""

from __future__ import annotations

import json
import shutil

import pytest

from mlx_sd.logs import run_history
from test_resume import COMMON, _metrics
from test_training import make_dataset, run_train


def _diffusers_lrs(name: str, warmup: int, total: int, lr: float, n: int) -> list[float]:
    """The LR of updates 0..n-1 from diffusers' scheduler built for `total` steps."""
    import torch
    from diffusers.optimization import get_scheduler

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("length") / "data", n=4)


def _args(model, dataset, out):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", dataset, "--output_dir", out,
            "--checkpointing_steps", 4, *COMMON]


@pytest.fixture(scope="module")
def finished(tiny_mlx_dir, dataset, tmp_path_factory):
    """A finished 4-step run; each test continues a copy of it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert run_train(*_args(tiny_mlx_dir, dataset, out), "--max_train_steps", 4) == 0
    return out


def test_a_finished_run_continues_to_more_steps(finished, tiny_mlx_dir, dataset, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    args = _args(tiny_mlx_dir, dataset, out)
    assert run_train(*args, "--max_train_steps", 6, "--resume_from_checkpoint", "latest") == 0
    said = capsys.readouterr().out
    assert "run length changed: --max_train_steps 6 (checkpoint: 4)" in said
    assert "The result differs from a straight run of the new length" in said
    got = _metrics(out)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    # steps 1-4 followed the 4-step cosine, steps 5-6 the 6-step cosine from step 4 on (diffusers' rebuild)
    old = _diffusers_lrs("cosine", 2, 4, 1e-3, 4)
    new = _diffusers_lrs("cosine", 2, 6, 1e-3, 6)
    for s in range(1, 7):
        want = old[s - 1] if s <= 4 else new[s - 1]
        assert got[s]["lr"] == pytest.approx(want, rel=1e-5, abs=1e-12), s
    assert json.loads((out / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())["step"] == 6
    # the loss curve and the history cover the whole run, not only the resumed part
    assert [r["step"] for r in run_history(out / "logs") if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_a_shorter_length_than_the_checkpoint_is_refused(finished, tiny_mlx_dir, dataset, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    args = _args(tiny_mlx_dir, dataset, out)
    assert run_train(*args, "--max_train_steps", 3, "--resume_from_checkpoint", "latest") != 0
    err = capsys.readouterr().err
    assert "is at step 4, past the 3 steps of --max_train_steps 3 (checkpoint: 4)" in err


def test_history_prefers_the_resumed_records(tmp_path):
    logs = tmp_path / "logs"
    (logs / "20260101-000000").mkdir(parents=True)
    (logs / "20260102-000000").mkdir()
    (logs / "20260101-000000" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)) + "{broken\n")
    (logs / "20260102-000000" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 2.0}) + "\n" for s in range(4, 8)))
    hist = run_history(logs)
    assert [(r["step"], r["loss"]) for r in hist] == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 2.0), (5, 2.0), (6, 2.0),
                                                      (7, 2.0)]
