"""Data-parallel training: train.py under `mlx.launch` (ring backend over loopback, 2 ranks).

2 ranks at batch 2 x accumulation 4 must train what one process at batch 2 x accumulation 8
trains (the same 16 images per update, each at the same position of the global batch with the
same noise/timestep/latent draw/flip/dropout masks), checkpoints must cross between the two ways
of running with any split of the same global batch, a rank that dies must stop the run with a
message naming it, and ranks that disagree must not start.
Each rank runs with one BLAS thread and the single process with this machine's default; OpenBLAS
sums in an order that depends on the thread count, so runs are compared within TOL, not bit for bit.
"""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lora.formats import load_adapter
from mlx_sd.checkpoint import latest_checkpoint, list_checkpoints
from test_training import ROOT, make_dataset, run_train

LAUNCHER = Path(sys.executable).parent / "mlx.launch"
pytestmark = pytest.mark.skipif(not LAUNCHER.exists(), reason="mlx.launch is not installed next to this python")

# Everything random is on: latent sampling, noise, timesteps, flips, LoRA dropout (under gradient
# checkpointing); 16 images per update.
ARGS = ["--resolution", 128, "--random_flip", "--lr_scheduler", "cosine", "--gradient_checkpointing",
        "--lr_warmup_steps", 2, "--learning_rate", 1e-3, "--lora_dropout", 0.1, "--no_validation", "--seed", 11,
        "--max_train_steps", 4, "--checkpointing_steps", 2]
ONE = ["--train_batch_size", 2, "--gradient_accumulation_steps", 8]  # one process
TWO = ["--train_batch_size", 2, "--gradient_accumulation_steps", 4]  # each of 2 ranks
TOL = 1e-5  # relative L2 of the adapter


def _free_port(n: int = 2) -> int:
    """A base port with n free ports above it (the ring backend listens on base + rank)."""
    for _ in range(100):
        base = random.randint(20000, 60000)
        socks = []
        try:
            for i in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def _train_cmd(*args, script=ROOT / "train.py"):
    return [sys.executable, str(script), *map(str, args), "--no_progress"]


def launch(command, *, ranks=2, wait=True, timeout=300):
    """`mlx.launch -n 2 --backend ring -- command` on loopback. mlx.launch exits 0 even when a
    rank fails, so callers check the ranks' output."""
    cmd = [str(LAUNCHER), "-n", str(ranks), "--backend", "ring", "--starting-port", str(_free_port(ranks)), "--",
           *map(str, command)]
    # One BLAS thread per rank: two ranks share this machine's two cores.
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    kw = dict(cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return subprocess.Popen(cmd, **kw)
    proc = subprocess.run(cmd, timeout=timeout, **kw)
    return proc.stdout + proc.stderr


def per_rank(script: str, *args):
    """A command whose text differs per rank: `script` is shell, with $MLX_RANK set by the launcher."""
    return ["sh", "-c", script, "sh", *map(str, args)]


def _adapter(path: Path):
    a = load_adapter(path)
    return (np.concatenate([np.array(a.A[k]).ravel() for k in sorted(a.A)]),
            np.concatenate([np.array(a.B[k]).ravel() for k in sorted(a.B)]))


def adapter_difference(p: Path, q: Path, what: str) -> float:
    """Largest relative L2 difference of the LoRA A and B weights (each family on its own)."""
    diffs = [np.linalg.norm(a - b) / np.linalg.norm(a) for a, b in zip(_adapter(p), _adapter(q))]
    print(f"{what}: relative L2 difference A {diffs[0]:.2e}, B {diffs[1]:.2e}")
    return max(diffs)


def losses(out: Path) -> dict[int, float]:
    recs = {}
    for d in sorted((out / "logs").iterdir()):
        f = d / "metrics.jsonl"
        for line in f.read_text().splitlines() if f.exists() else []:
            r = json.loads(line)
            recs[r["step"]] = r["loss"]
    return recs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("dist") / "data", n=6)


@pytest.fixture(scope="module")
def common(tiny_mlx_dir, dataset):
    return ["--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", dataset, *ARGS]


@pytest.fixture(scope="module")
def single(common, tmp_path_factory):
    """One process, batch 2 x accumulation 8."""
    out = tmp_path_factory.mktemp("single") / "run"
    assert run_train(*common, *ONE, "--output_dir", out) == 0
    return out


@pytest.fixture(scope="module")
def two_ranks(common, tmp_path_factory):
    """Two ranks, batch 2 x accumulation 4 each: the same global batch of 16."""
    out = tmp_path_factory.mktemp("two") / "run"
    log = launch(_train_cmd(*common, *TWO, "--output_dir", out))
    assert "done: 4 steps" in log, log
    return out, log


def test_two_ranks_train_what_one_process_trains(single, two_ranks):
    out, log = two_ranks
    assert "data parallel: 2 ranks; global batch 2 x 4 accumulation x 2 ranks = 16 images per update" in log
    assert log.count("done: 4 steps") == 1  # only rank 0 reports and writes
    assert adapter_difference(single / "lora_weights", out / "lora_weights",
                              "2 ranks x batch 2 x accumulation 4 vs 1 x batch 2 x accumulation 8") <= TOL
    # The loss logged is the global batch's: the same as one process's, step by step.
    a, b = losses(single), losses(out)
    assert sorted(b) == list(range(1, 5))
    np.testing.assert_allclose([b[s] for s in range(1, 5)], [a[s] for s in range(1, 5)], rtol=1e-5)
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2, 4]
    state = json.loads((out / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["config"]["world_size"] == 2 and state["config"]["global_batch"] == 16


def test_checkpoints_cross_between_one_and_two_ranks(common, single, two_ranks, tmp_path):
    """Any split of the same 16 images per update continues a checkpoint: ranks, per-device batch and
    accumulation all change here."""
    two, _ = two_ranks
    # 2 ranks -> 1 process: continue the 2-rank run's step-2 checkpoint at batch 4 x accumulation 4.
    a = tmp_path / "from_two"
    shutil.copytree(two / "checkpoints" / "checkpoint-2", tmp_path / "ck_two")
    assert run_train(*common, "--train_batch_size", 4, "--gradient_accumulation_steps", 4, "--output_dir", a,
                     "--resume_from_checkpoint", tmp_path / "ck_two") == 0
    # 1 process -> 2 ranks at batch 1 x accumulation 8: only rank 0 reads the checkpoint; the other
    # rank gets its state from rank 0.
    b = tmp_path / "from_one"
    log = launch(_train_cmd(*common, "--train_batch_size", 1, "--gradient_accumulation_steps", 8, "--output_dir", b,
                            "--resume_from_checkpoint", single / "checkpoints" / "checkpoint-2"))
    assert "resumed from" in log and "at step 2" in log and "done: 4 steps" in log, log
    assert sorted(losses(b)) == [3, 4]
    for out, what in ((a, "2 ranks -> 1 process"), (b, "1 process -> 2 ranks")):
        assert adapter_difference(single / "lora_weights", out / "lora_weights", f"{what} vs 1 process") <= TOL
        assert adapter_difference(two / "lora_weights", out / "lora_weights", f"{what} vs 2 ranks") <= TOL


def test_a_killed_rank_stops_the_run_and_leaves_a_usable_checkpoint(common, single, tmp_path):
    out = tmp_path / "run"
    pids = tmp_path / "pids"
    pids.mkdir()
    cmd = _train_cmd(*common, *TWO, "--checkpointing_steps", 1, "--output_dir", out)
    proc = launch(per_rank(f'echo $$ > {pids}/rank$MLX_RANK; exec "$@"', *cmd), wait=False)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "checkpoint-2").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()
    os.kill(int((pids / "rank1").read_text()), signal.SIGKILL)  # mid-run: 2 of 4 steps to go
    stdout, stderr = proc.communicate(timeout=120)  # the whole run stops: the launcher returns
    log = stdout + stderr
    assert "rank 0: error: lost the connection to rank 1" in log, log
    assert "The whole run stops at step" in log and "the last complete checkpoint is" in log, log
    assert "done:" not in log and not (out / "lora_weights").exists()
    with pytest.raises(ProcessLookupError):  # rank 0 has ended too
        os.kill(int((pids / "rank0").read_text()), 0)

    last = latest_checkpoint(out / "checkpoints")
    assert 2 <= int(last.name.split("-")[1]) < 4 and str(last) in log
    # Usable: one process (batch 2 x accumulation 8) resumes it and ends where the uninterrupted run ends.
    assert run_train(*common, *ONE, "--output_dir", out, "--resume_from_checkpoint", "latest") == 0
    assert adapter_difference(single / "lora_weights", out / "lora_weights", "killed, resumed vs 1 process") <= TOL


@pytest.mark.parametrize("what", ["settings", "code"])
def test_ranks_that_differ_do_not_start(what, common, tmp_path):
    """Two Macs whose --config files differ, or whose train.py differs, are refused at start-up."""
    out = tmp_path / "run"
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    script = ROOT / "train.py"
    if what == "settings":
        for r, beta2 in ((0, 0.999), (1, 0.99)):  # a key the command line does not set (it would win)
            (cfg / f"rank{r}.json").write_text(json.dumps({"adam_beta2": beta2}))
        cmd = per_rank(f'exec "$@" --config {cfg}/rank$MLX_RANK.json',
                       *_train_cmd(*common, *TWO, "--output_dir", out))
    else:
        (cfg / "train.py").write_text(script.read_text() + "\n# an edit made on one Mac only\n")
        cmd = per_rank(f'test "$MLX_RANK" = 0 && s={script} || s={cfg}/train.py; exec {sys.executable} "$s" "$@"',
                       *_train_cmd(*common, *TWO, "--output_dir", out)[2:])
    t = time.time()
    log = launch(cmd, timeout=120)
    print(f"refused in {time.time() - t:.1f}s")
    assert "the ranks are not running the same training" in log, log
    if what == "settings":
        assert "rank 1 differs from rank 0 in its run settings" in log
        assert "settings that differ: adam_beta2 (on rank 1: adam_beta2=0.99)" in log
        assert "(on rank 0: adam_beta2=0.999)" in log
        assert "code" not in log.split("rank 1 differs from rank 0 in its ")[1].splitlines()[0]
    else:
        assert "rank 1 differs from rank 0 in its code (train.py" in log
    assert "data parallel" not in log and not (out / "checkpoints").exists()
