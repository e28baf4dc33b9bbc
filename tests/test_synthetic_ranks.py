"""mlx-sd-generate under `mlx.launch` (ring backend over loopback, 2 ranks).

Two ranks must write byte for byte the files one process writes (each image made by one rank
with the seed it has in one process, rank 0 writing everything), and a run that loses a rank
must keep its finished images and make exactly the missing ones when run again.
Byte-identical holds for the same BLAS thread count in every process: on some CPUs OpenBLAS's
sums depend on the number of threads, so the one-process run here uses the ranks' environment
(one OpenBLAS thread each, `launch`'s), not this test process's.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_distributed import LAUNCHER, ROOT, launch, per_rank

pytestmark = pytest.mark.skipif(not LAUNCHER.exists(), reason="mlx.launch is not installed next to this python")

TEMPLATE = "color = black | brown | white | blue\na photo of {color} {leather|canvas} casual shoes, {high|} quality\n"
JOBS = 11  # uneven: the last global batch has one image, for rank 0 only


def command(model, template, out, *extra):
    return ["--model", model, "--template", template, "--num_prompts", JOBS, "--steps", 3, "--height", 64,
            "--width", 64, "--seed", 5, "--batch_size", 1, "--output_dir", out, *extra]


def one_process(command, timeout=600):
    """`command` in one process with the environment `launch` gives each rank (one BLAS thread)."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, *map(str, command)], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def files(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tiny_mlx_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gen_ranks")
    template = root / "t.txt"
    template.write_text(TEMPLATE)
    one = root / "one"
    one_process(["-m", "mlx_sd.generate", *command(tiny_mlx_dir, template, one)])
    two = root / "two"
    log = launch([sys.executable, "-m", "mlx_sd.generate", *command(tiny_mlx_dir, template, two)], timeout=600)
    return tiny_mlx_dir, template, one, two, log


def test_two_ranks_write_what_one_process_writes(runs):
    _, _, one, two, log = runs
    assert "2 ranks: 11 images in global batches of 1 x 2" in log, log
    assert log.count("made 11 images") == 1  # only rank 0 reports (and writes)
    a, b = files(one), files(two)
    names = [r["file_name"] for r in json.loads(a["captions.json"])]
    assert len(names) == len(set(names)) == JOBS  # none twice, none missing
    assert sorted(a) == sorted(b) == sorted(["captions.json", "generation.json", *(f"images/{n}" for n in names)])
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]  # byte-identical


def test_a_killed_rank_stops_the_run_and_the_rest_is_made_on_resume(runs, tmp_path):
    model, template, one, _, _ = runs
    out, pids = tmp_path / "killed", tmp_path / "pids"
    pids.mkdir()
    cmd = [sys.executable, "-m", "mlx_sd.generate", *map(str, command(model, template, out))]
    proc = launch(per_rank(f'echo $$ > {pids}/rank$MLX_RANK; exec "$@"', *cmd), wait=False)
    deadline = time.time() + 300
    while len(list((out / "images").glob("*.png"))) < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()
    os.kill(int((pids / "rank1").read_text()), signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=120)
    log = stdout + stderr
    # mlx.launch stops the other rank with SIGTERM when one dies; a rank inside a collective may see
    # the lost connection first. Either way rank 0 keeps what it has and says how to go on.
    assert ("rank 0: stopped (SIGTERM); under mlx.launch this means another rank failed" in log
            or "rank 0: error: lost the connection to rank 1" in log), log
    assert "images are in" in log and "Re-run the same command" in log.replace("re-run", "Re-run"), log
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")}
    assert 4 <= len(kept) < JOBS
    assert len(json.loads((out / "captions.json").read_text())) == len(kept)  # captions match the images

    log = launch(cmd, timeout=600)
    assert f"resuming: {len(kept)} of {JOBS}" in log and f"made {JOBS - len(kept)} images" in log, log
    assert {n: (out / "images" / n).stat().st_mtime_ns for n in kept} == kept  # none made again
    a, b = files(one), files(out)
    assert sorted(a) == sorted(b) and all(a[k] == b[k] for k in a)  # none missing, all the same
