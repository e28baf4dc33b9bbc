"""A user's runs are never destroyed or mixed, and every bad value or fault gets one clear message.

Everything here goes through the command lines (train.main, convert's and generate's main), as a
user would meet it: the exit code, the one message printed, and what is left on disk.
"""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_training import make_dataset

import train
from convert.__main__ import main as convert_main
from mlx_sd import generate as gen
from mlx_sd.checkpoint import list_checkpoints
from mlx_sd.run import LOCK

FAST = ["--resolution", 64, "--train_batch_size", 2, "--lr_warmup_steps", 0, "--lr_scheduler", "constant",
        "--no_validation", "--seed", 5]


def run_train(*args) -> int:
    return train.main([str(a) for a in args] + ["--no_progress"])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("hardening") / "data", n=4, size=64)


def args_for(model, data, out, *extra):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", out, *FAST, *extra]


def errors(text: str) -> list[str]:
    """The error lines a run printed (each error must appear once)."""
    return [line for line in text.splitlines() if "error" in line.lower()]


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name)


@pytest.fixture(scope="module")
def finished(tiny_mlx_dir, data, tmp_path_factory):
    """A finished 4-step run with checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert run_train(*args_for(tiny_mlx_dir, data, out, "--max_train_steps", 4, "--checkpointing_steps", 2)) == 0
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- runs are never mixed


def test_a_finished_run_is_never_overwritten(finished, tiny_mlx_dir, data, tmp_path, capsys):
    out = copy_run(finished, tmp_path / "run")
    before = {p: p.read_bytes() for p in (out / "lora_weights").iterdir()}
    rc = run_train(*args_for(tiny_mlx_dir, data, out, "--max_train_steps", 2, "--seed", 9))
    err = capsys.readouterr().err
    assert rc == 2
    assert "already holds a run (checkpoints up to step 4 and a finished adapter" in err
    assert "--resume_from_checkpoint latest" in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in (out / "lora_weights").iterdir()} == before
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2, 4]
    assert not (out / LOCK).exists()


def test_overwrite_moves_the_old_run_aside(finished, tiny_mlx_dir, data, tmp_path, capsys):
    out = copy_run(finished, tmp_path / "run")
    old = (out / "lora_weights" / "adapter_model.safetensors").read_bytes()
    assert run_train(*args_for(tiny_mlx_dir, data, out, "--max_train_steps", 1, "--seed", 9, "--overwrite")) == 0
    kept = list(out.glob("replaced-*"))
    assert len(kept) == 1 and (kept[0] / "lora_weights" / "adapter_model.safetensors").read_bytes() == old
    assert [s for s, _ in list_checkpoints(kept[0] / "checkpoints")] == [2, 4]
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [1]  # the new run's own, nothing pruned
    assert "previous run's outputs are now in" in capsys.readouterr().out


def test_resume_refuses_another_seed_or_setting(finished, tiny_mlx_dir, data, tmp_path, capsys):
    out = copy_run(finished, tmp_path / "run")
    rc = run_train(*args_for(tiny_mlx_dir, data, out, "--max_train_steps", 6, "--seed", 9,
                             "--resume_from_checkpoint", "latest"))
    err = capsys.readouterr().err
    assert rc == 2 and "belongs to a different run" in err
    assert "seed: checkpoint 5 vs now 9" in err
    assert "max_train_steps" not in err  # a longer run is allowed (tests/test_run_length.py); the seed is not


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_runs(tiny_mlx_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename, "started": "now"}))
        rc = run_train(*args_for(tiny_mlx_dir, data, out, "--max_train_steps", 1))
        err = capsys.readouterr().err
        assert rc == 2 and f"in use by another training (pid {holder.pid}" in err
        assert not (out / "logs").exists() and not (out / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    # Its process is gone now: the lock is stale and the next run takes it over.
    assert run_train(*args_for(tiny_mlx_dir, data, out, "--max_train_steps", 1)) == 0
    assert not (out / LOCK).exists()


def test_two_runs_started_together_never_share_a_folder(tiny_mlx_dir, data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(Path(train.__file__)), *map(str, args_for(tiny_mlx_dir, data, out, "--max_train_steps",
                                                                         2)),
           "--no_progress"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "in use by another training" in loser or "already holds a run" in loser
    assert len(list((out / "logs").iterdir())) == 1


# ----------------------------------------------------------------------------- values checked at once


@pytest.mark.parametrize("flag,value", [
    ("--max_train_steps", 0), ("--max_train_steps", -5), ("--learning_rate", -1), ("--train_batch_size", 0),
    ("--train_batch_size", -1), ("--gradient_accumulation_steps", 0), ("--resolution", 0), ("--resolution", -64),
    ("--lora_rank", 0), ("--lora_dropout", 1.5), ("--seed", -1), ("--validation_steps", -1),
])
def test_bad_numbers_are_refused_with_their_range(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--train_data_dir", str(tmp_path), flag, str(value)])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert f"argument {flag}: {value} is out of range: expected a value" in err


def test_bad_numbers_in_a_config_file_are_refused(tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"max_train_steps": 0}))
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--train_data_dir", str(tmp_path), "--config", str(cfg)])
    assert e.value.code == 2 and "max_train_steps: 0 is out of range" in capsys.readouterr().err


def test_resolution_the_model_cannot_take_fails_before_encoding(tiny_mlx_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    rc = run_train(*args_for(tiny_mlx_dir, data, out, "--resolution", 72))
    err = capsys.readouterr().err
    assert rc == 2 and "--resolution 72: this model needs a multiple of 64" in err and "e.g. 64 or 128" in err
    assert not (out / "cache").exists()


def test_a_typo_in_resume_fails_before_any_work(tiny_mlx_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    rc = run_train(*args_for(tiny_mlx_dir, data, out, "--resume_from_checkpoint", tmp_path / "checkpint-2"))
    err = capsys.readouterr().err
    assert rc == 2 and "no such checkpoint folder" in err
    assert not (out / "cache").exists() and not (out / "logs").exists()


def test_help_shows_each_default_once(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: False)" not in text
    flat = " ".join(text.split())
    assert "(default: 8)" in flat  # --lora_rank: shown by the formatter
    steps = flat.split("--max_train_steps MAX_TRAIN_STEPS")[1].split("--num_train_epochs")[0]
    assert steps.count("default") == 1  # stated in the help's own words, not repeated


# ----------------------------------------------------------------------------- only the dataset is read


def test_entries_outside_the_dataset_are_skipped_and_named(tiny_mlx_dir, tmp_path, capsys):
    root = make_dataset(tmp_path / "data", n=4, size=64)
    shutil.copy(root / "images" / "img00.png", tmp_path / "outside.png")
    shutil.copy(root / "images" / "img00.png", root / "outside.png")
    caps = json.loads((root / "captions.json").read_text())
    caps.update({"../outside.png": "x", "../../outside.png": "y", "/etc/hostname": "z",
                 "./img01.png": "the same file under another name"})
    (root / "captions.json").write_text(json.dumps(caps))
    out = tmp_path / "run"
    assert run_train(*args_for(tiny_mlx_dir, root, out, "--max_train_steps", 1)) == 0
    text = capsys.readouterr().out
    for name in ("../outside.png", "../../outside.png", "/etc/hostname"):
        assert f"skipped {name}: outside" in text
    assert "skipped ./img01.png: the same file as img01.png" in text
    assert "dataset: 4 images (4 skipped)" in text
    rc = run_train(*args_for(tiny_mlx_dir, root, tmp_path / "strict", "--max_train_steps", 1, "--strict_data"))
    assert rc == 2 and "4 problem(s)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- faults: one line, nothing lost


def test_errors_are_printed_once_and_failed_runs_leave_no_logs(finished, tiny_mlx_dir, data, tmp_path):
    cases = {  # an error before the logs exist, one after, and one raised by the run folder itself
        "no data": args_for(tiny_mlx_dir, tmp_path / "nowhere", tmp_path / "a"),
        "bad resolution": args_for(tiny_mlx_dir, data, tmp_path / "b", "--resolution", 72),
        "folder holds a run": args_for(tiny_mlx_dir, data, copy_run(finished, tmp_path / "c")),
    }
    for what, args in cases.items():
        r = subprocess.run([sys.executable, str(Path(train.__file__)), *map(str, args), "--no_progress"],
                           capture_output=True, text=True)
        assert r.returncode == 2, (what, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: "), (what, r.stderr)
    assert not (tmp_path / "a" / "logs").exists() and not (tmp_path / "b" / "logs").exists()
    assert not (tmp_path / "a" / LOCK).exists() and not (tmp_path / "b" / LOCK).exists()
    assert len(list((tmp_path / "c" / "logs").iterdir())) == 1  # the finished run's own logs only


def test_skipped_entries_are_listed_once(tiny_mlx_dir, tmp_path):
    root = make_dataset(tmp_path / "data", n=4, size=64, extra={"gone.png": "a missing file"})
    r = subprocess.run([sys.executable, str(Path(train.__file__)),
                        *map(str, args_for(tiny_mlx_dir, root, tmp_path / "run", "--max_train_steps", 1)),
                        "--no_progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (r.stdout + r.stderr).count("gone.png") == 1


@pytest.mark.parametrize("damage", ["truncated adapter", "truncated optimizer", "garbage state", "state is a list",
                                    "state without step"])
def test_damaged_checkpoints_are_named_and_latest_falls_back(damage, finished, tiny_mlx_dir, data, tmp_path, capsys):
    out = copy_run(finished, tmp_path / "run")
    ck = out / "checkpoints" / "checkpoint-4"
    if damage.startswith("truncated"):
        f = ck / ("adapter_model.safetensors" if "adapter" in damage else "optimizer.safetensors")
        f.write_bytes(f.read_bytes()[:-100])
    else:
        text = {"garbage state": "{not json", "state is a list": "[1, 2]", "state without step": '{"epoch": 1}'}
        (ck / "trainer_state.json").write_text(text[damage])
    rc = run_train(*args_for(tiny_mlx_dir, data, out, "--max_train_steps", 4, "--checkpointing_steps", 2,
                             "--resume_from_checkpoint", ck))
    err = capsys.readouterr().err
    assert rc == 2 and f"{ck}: cannot resume from it" in err and len(errors(err)) == 1, err
    rc = run_train(*args_for(tiny_mlx_dir, data, out, "--max_train_steps", 4, "--checkpointing_steps", 2,
                             "--resume_from_checkpoint", "latest"))
    printed = capsys.readouterr().out
    assert rc == 0 and f"skipping {ck}" in printed and "resumed from" in printed and "checkpoint-2 at step 2" in printed


def test_interrupted_encoding_says_what_is_lost(tiny_mlx_dir, data, tmp_path, monkeypatch, capsys):
    import mlx_sd.data as data_mod

    def terminated(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this

    monkeypatch.setattr(data_mod, "encode_images", terminated)
    rc = run_train(*args_for(tiny_mlx_dir, data, tmp_path / "run", "--max_train_steps", 1))
    assert rc == 143
    assert "SIGTERM while encoding the dataset: nothing was cached yet" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the caller's handler is back


def test_output_dir_that_is_a_file(tiny_mlx_dir, data, tmp_path, capsys):
    f = tmp_path / "a-file"
    f.write_text("mine")
    assert run_train(*args_for(tiny_mlx_dir, data, f, "--max_train_steps", 1)) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert gen.main(["--model", str(tiny_mlx_dir), "--prompt", "x", "--output_dir", str(f), "--steps", "1"]) == 2
    assert "a file is in the way" in capsys.readouterr().err
    assert convert_main([str(tiny_mlx_dir), str(f), "--force"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert f.read_text() == "mine"


@pytest.mark.parametrize("kind", ["text", "pickle", "peft config"])
def test_adapters_that_are_not_adapters(kind, tiny_mlx_dir, finished, tmp_path, capsys):
    if kind == "peft config":
        lora = copy_run(finished / "lora_weights", tmp_path / "peft")
        (lora / "adapter_config.json").write_text("{garbage")
        expect = "adapter_config.json: not a readable PEFT adapter config"
    else:
        lora = tmp_path / "lora.safetensors"
        lora.write_bytes(b"not an adapter\n" if kind == "text" else pickle.dumps({"w": [1.0] * 100}))
        expect = "cannot load this adapter: " + ("not a safetensors file" if kind == "text" else "a PyTorch pickle")
    rc = gen.main(["--model", str(tiny_mlx_dir), "--prompt", "x", "--output_dir", str(tmp_path / "g"),
                   "--steps", "1", "--lora", str(lora)])
    err = capsys.readouterr().err
    assert rc == 2 and expect in err and len(errors(err)) == 1, err


def test_convert_names_a_truncated_weights_file(tiny_diffusers_dir, tmp_path, capsys):
    src = copy_run(tiny_diffusers_dir, tmp_path / "src")
    weights = src / "vae" / "diffusion_pytorch_model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:len(whole) - 1000])
    assert convert_main([str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"vae/diffusion_pytorch_model.safetensors: truncated: {len(whole) - 1000:,} bytes of {len(whole):,}" in err
    assert not (tmp_path / "out").exists()


def test_transformers_says_nothing_about_pytorch(tiny_mlx_dir):
    code = ("import sys; sys.modules['torch'] = None\n"  # as on a machine without torch
            "from mlx_sd.tokenizer import Tokenizer\n"
            f"Tokenizer({str(tiny_mlx_dir / 'tokenizer')!r})\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "PyTorch" not in r.stderr + r.stdout


# ----------------------------------------------------------------------------- disk full


def _mount_tmpfs(path: Path, kib: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None or os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_disk_full_while_checkpointing_keeps_the_last_checkpoint(tiny_mlx_dir, data, tmp_path, capsys):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, 32768):
        pytest.skip("needs root and `mount -t tmpfs` to make a small disk (CI runs as root)")
    try:
        out = disk / "run"
        args = args_for(tiny_mlx_dir, data, out, "--max_train_steps", 4, "--checkpointing_steps", 2)
        assert run_train(*args) == 0
        # As if the run had stopped after its first checkpoint:
        shutil.rmtree(out / "checkpoints" / "checkpoint-4")
        shutil.rmtree(out / "lora_weights")
        filler = disk / "filler"
        with open(filler, "wb") as f:  # leave ~16 KiB: less than a checkpoint
            while shutil.disk_usage(disk).free > 16 * 1024:
                f.write(b"\0" * min(256 * 1024, shutil.disk_usage(disk).free - 16 * 1024))
        before = (out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors").read_bytes()
        rc = run_train(*args, "--resume_from_checkpoint", "latest")
        err = capsys.readouterr().err
        assert rc == 2 and len(errors(err)) == 1, err
        assert "could not be written: the disk is full" in err
        assert "the last complete checkpoint is" in err and "checkpoint-2" in err
        assert leftovers(out) == []
        assert (out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors").read_bytes() == before
        filler.unlink()
        assert run_train(*args, "--resume_from_checkpoint", "latest") == 0
        assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2, 4]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_disk_full_while_exporting_a_single_file(tiny_mlx_dir, tmp_path, capsys):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, 256):
        pytest.skip("needs root and `mount -t tmpfs` to make a small disk (CI runs as root)")
    try:
        rc = convert_main(["--to-single-file", str(tiny_mlx_dir), str(disk / "model.safetensors")])
        err = capsys.readouterr().err
        assert rc == 2 and "model.safetensors: could not be written: the disk is full" in err, err
        assert list(disk.iterdir()) == []  # no partial file
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)

