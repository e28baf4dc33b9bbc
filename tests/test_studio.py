"""The studio without a browser: Bradley-Terry fit, vote store, sources and pairing, and the server's refusals.

The server runs as the real CLI (`python -m mlx_sd.studio`) on an ephemeral loopback port; requests go
through http.client so paths reach it byte for byte (no client-side `..` normalisation).
"""

from __future__ import annotations

import csv
import http.client
import io
import json
import math
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

pytest.importorskip("starlette", reason="the studio extra is not installed: pip install -e '.[studio]'")

from mlx_sd.studio import ranking
from mlx_sd.studio.sources import Item, MetricsTail, Source, match, open_roots, safe_path
from mlx_sd.studio.votes import NonceError, VoteStore

PROMPTS = ["a black shoe on white", "a brown boot on white"]


# ----------------------------------------------------------------------------- folders as the product writes them


def metric_line(step: int, scale: float = 0.1) -> str:
    return json.dumps({"step": step, "epoch": 0, "loss": scale / step, "lr": 1e-4, "grad_norm": 0.5 + step % 3,
                       "s_per_step": 2.5, "peak_memory_gb": 12.0}) + "\n"


def make_run(path: Path, steps=(100, 200, 300), prompts=PROMPTS, images=2, lines=7, seed=42, scale=0.1) -> Path:
    """A train.py --output_dir: logs/<time>/metrics.jsonl + config.json, validation PNGs (colour = step)."""
    logs = path / "logs" / "20260101-120000"
    logs.mkdir(parents=True)
    (logs / "config.json").write_text(json.dumps({"seed": seed, "validation_prompts": list(prompts)}))
    (logs / "metrics.jsonl").write_text("".join(metric_line(s, scale) for s in range(1, lines + 1)))
    val = path / "validation"
    val.mkdir()
    for s in steps:
        for p in range(len(prompts)):
            for i in range(images):
                Image.new("RGB", (32, 32), (s % 256, 40 * p, 60 * i)).save(
                    val / f"epoch{s // 100:03d}_step{s:04d}_prompt{p}_img{i}.png")
        Image.new("RGB", (64, 64)).save(val / f"epoch{s // 100:03d}_step{s:04d}_grid.png")
    return path


def make_generated(path: Path, color, prompts=PROMPTS, n=2, seed=0) -> Path:
    """An mlx-sd-generate folder: images/prompt{p:05d}_img{i:03d}.png with 'Seed: N' in the PNG text."""
    (path / "images").mkdir(parents=True)
    captions = {}
    for p, prompt in enumerate(prompts):
        for i in range(n):
            name = f"prompt{p:05d}_img{i:03d}.png"
            info = PngInfo()
            info.add_text("parameters", f"{prompt}\nNegative prompt: \nSteps: 25, Seed: {seed + 1000 * p + i}")
            Image.new("RGB", (32, 32), tuple(color)).save(path / "images" / name, pnginfo=info)
            captions[name] = prompt
    (path / "captions.json").write_text(json.dumps(captions))
    return path


class Studio:
    """`python -m mlx_sd.studio FOLDERS --port 0` in a subprocess; the address is read from its output."""

    def __init__(self, folders, db: Path, *extra: str):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "mlx_sd.studio", *map(str, folders), "--port", "0",
                                      "--db", str(db), *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env)
        self.output, deadline = [], time.time() + 60
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("studio exited: " + "".join(self.output))
            self.output.append(line)
            m = re.search(r"open (http://([\d.]+):(\d+)/\S*)", line)
            if m:
                self.url, self.host, self.port = m.group(1), m.group(2), int(m.group(3))
                self.base = f"http://{self.host}:{self.port}"
                return
        raise RuntimeError("studio did not print its address: " + "".join(self.output))

    def request(self, method: str, path: str, body=None, headers=None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        hdrs = dict(headers or {})
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=body, headers=hdrs)
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r.status, data

    def json(self, path: str):
        status, data = self.request("GET", path)
        assert status == 200, (path, status, data[:300])
        return json.loads(data)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def folders(tmp_path):
    return [make_run(tmp_path / "run"), make_generated(tmp_path / "base", (0, 0, 255)),
            make_generated(tmp_path / "lora", (255, 0, 0))]


@pytest.fixture
def studio(folders, tmp_path):
    s = Studio(folders, tmp_path / "votes.sqlite")
    yield s
    s.kill()


# ----------------------------------------------------------------------------- Bradley-Terry


def mm_bradley_terry(W: np.ndarray, iters: int = 20000) -> np.ndarray:
    """Hunter's (2004) MM iteration for the Bradley-Terry MLE: an independent algorithm to check Newton's."""
    n = W.shape[0]
    p = np.ones(n)
    N = W + W.T
    for _ in range(iters):
        denom = (N / (p[:, None] + p[None, :])).sum(axis=1)
        p = W.sum(axis=1) / denom
        p /= np.exp(np.log(p).mean())
    t = np.log(p)
    return t - t.mean()


FASTCHAT_WINNER = {"A": "model_a", "B": "model_b", "tie": "tie", "both_bad": "tie (bothbad)"}


def fastchat_mle_elo(votes: list[dict], SCALE=400, BASE=10, INIT_RATING=1000) -> dict[str, float]:
    """FastChat's `compute_mle_elo` (fastchat/serve/monitor/elo_analysis.py, the version GenAI-Arena runs), step
    by step on the same votes: its three pivot tables (pandas' union alignment: a cell absent from any table is
    NaN and its pair is skipped), `ptbl_a_win * 2 + ptbl_b_win.T * 2 + ptbl_tie`, two weighted rows per
    ordered pair, and scikit-learn's LogisticRegression(fit_intercept=False, penalty=None, tol=1e-6)."""
    from sklearn.linear_model import LogisticRegression

    battles = [(v["source_a"], v["source_b"], FASTCHAT_WINNER[v["answer"]]) for v in votes]

    def pivot(rows):  # pd.pivot_table(..., index="model_a", columns="model_b", aggfunc="size", fill_value=0)
        table = {}
        for ma, mb, _ in rows:
            table[ma, mb] = table.get((ma, mb), 0) + 1
        return {ma for ma, _, _ in rows}, {mb for _, mb, _ in rows}, table

    a_idx, a_col, a_win = pivot([r for r in battles if r[2] == "model_a"])
    b_idx, b_col, b_win = pivot([r for r in battles if r[2] == "model_b"])
    ties = [r for r in battles if r[2] in ("tie", "tie (bothbad)")]
    t_idx, t_col, tie = pivot(ties) if ties else (a_idx, a_col, {})
    index = sorted(a_idx | b_col | t_idx | t_col)
    columns = sorted(a_col | b_idx | t_col | t_idx)

    def win(i, j):  # ptbl_win.loc[i, j], NaN where one of the aligned tables lacks the cell
        cells = [(i in a_idx and j in a_col, 2 * a_win.get((i, j), 0)),
                 (j in b_idx and i in b_col, 2 * b_win.get((j, i), 0))]
        if ties:
            cells.append((i in t_idx and j in t_col and j in t_idx and i in t_col,
                          tie.get((i, j), 0) + tie.get((j, i), 0)))
        else:
            cells.append((i in a_idx and j in a_col, 0))
        return sum(v for _, v in cells) if all(ok for ok, _ in cells) else math.nan

    models = {m: k for k, m in enumerate(index)}
    X, Y, weights = [], [], []
    for ma in index:
        for mb in columns:
            if ma == mb or math.isnan(win(ma, mb)) or math.isnan(win(mb, ma)):
                continue
            row = np.zeros(len(models))
            row[models[ma]], row[models[mb]] = math.log(BASE), -math.log(BASE)
            X += [row, row]
            Y += [1.0, 0.0]
            weights += [win(ma, mb), win(mb, ma)]
    import sklearn

    # scikit-learn 1.8 renamed FastChat's penalty=None (no regularisation) to C=inf; same fit.
    new = tuple(map(int, sklearn.__version__.split(".")[:2])) >= (1, 8)
    unpenalised = {"C": math.inf} if new else {"penalty": None}
    lr = LogisticRegression(fit_intercept=False, tol=1e-6, **unpenalised)
    lr.fit(np.array(X), np.array(Y), sample_weight=np.array(weights))
    return dict(zip(index, SCALE * lr.coef_[0] + INIT_RATING))


def ours(votes: list[dict]) -> dict[str, float]:
    return {r["name"]: r["score"] for r in ranking.summarize(votes, rounds=0)["ratings"]}


def test_bt_matches_fastchat_on_seven_three_two():
    pytest.importorskip("sklearn", reason="scikit-learn runs FastChat's formula: pip install -e '.[dev]'")
    # lora wins 7, loses 3, ties 2 (one "both bad"), on both sides of the pair as an arena shows them: FastChat's
    # pivot-table sum leaves a pair out when one outcome never occurs in one orientation.
    def v(a, b, answer, n=1):
        return [{"source_a": a, "source_b": b, "answer": answer}] * n

    votes = (v("lora", "base", "A", 4) + v("base", "lora", "B", 3) + v("lora", "base", "B", 2) + v("base", "lora", "A")
             + v("lora", "base", "tie") + v("base", "lora", "both_bad"))
    got, ref = ours(votes), fastchat_mle_elo(votes)
    assert set(got) == set(ref)
    for name in ref:
        assert got[name] == pytest.approx(ref[name], abs=0.5), (name, got, ref)
    assert got["lora"] - got["base"] > 110  # a tie weighed like two decisive votes would give 102


def test_bt_matches_fastchat_on_random_votes():
    pytest.importorskip("sklearn", reason="scikit-learn runs FastChat's formula: pip install -e '.[dev]'")
    rng = np.random.default_rng(7)
    names = ["base", "r8", "r16", "r32"]
    true = np.array([-0.5, 0.1, 0.4, 0.2])
    votes = []
    for _ in range(200):
        i, j = rng.choice(4, 2, replace=False)
        p = 1 / (1 + np.exp(-(true[i] - true[j])))
        u = rng.random()
        answer = "tie" if u < 0.12 else "both_bad" if u < 0.2 else "A" if rng.random() < p else "B"
        votes.append({"source_a": names[i], "source_b": names[j], "answer": answer})
    got, ref = ours(votes), fastchat_mle_elo(votes)
    assert set(got) == set(ref) == set(names)
    for name in names:
        assert got[name] == pytest.approx(ref[name], abs=0.5), (name, got, ref)


def test_bt_matches_mm_on_four_sources():
    rng = np.random.default_rng(3)
    true = np.array([0.8, 0.1, -0.3, -0.6])
    a = rng.integers(0, 4, 600)
    b = (a + rng.integers(1, 4, 600)) % 4
    p = 1 / (1 + np.exp(-(true[a] - true[b])))
    u = rng.random(600)
    outcome = np.where(u < 0.1, 2, np.where(u < 0.1 + 0.9 * p, 0, 1))
    W = ranking.win_matrix(4, a, b, outcome)
    t = ranking.fit_bradley_terry(W)
    np.testing.assert_allclose(t, mm_bradley_terry(W), atol=2e-3)
    assert list(np.argsort(-t)) == [0, 1, 2, 3]


def test_bt_all_wins_stays_finite_and_ordered():
    a, b, outcome = np.array([0, 0, 0]), np.array([1, 1, 1]), np.array([0, 0, 0])
    t = ranking.fit_bradley_terry(ranking.win_matrix(2, a, b, outcome))
    assert np.all(np.isfinite(t)) and t[0] > t[1] + 3


def test_summary_counts_matrix_and_intervals():
    votes = ([{"source_a": "lora", "source_b": "base", "answer": "A"}] * 12
             + [{"source_a": "lora", "source_b": "base", "answer": "B"}] * 4
             + [{"source_a": "base", "source_b": "lora", "answer": "tie"}] * 2
             + [{"source_a": "base", "source_b": "lora", "answer": "both_bad"}] * 2)
    s = ranking.summarize(votes, rounds=300)
    assert [r["name"] for r in s["ratings"]] == ["lora", "base"]
    for r in s["ratings"]:
        assert r["lo"] <= r["score"] <= r["hi"] and r["battles"] == 20
    m = s["matrix"]
    i, j = m["names"].index("lora"), m["names"].index("base")
    assert m["win_fraction"][i][j] == pytest.approx(12 / 16) and m["win_fraction"][j][i] == pytest.approx(4 / 16)
    assert m["battles"][i][j] == 20
    rows = {(p["a"], p["b"]): p for p in s["pairs"]}
    assert rows[("lora", "base")]["a_wins"] == 12 and rows[("lora", "base")]["b_wins"] == 4
    assert rows[("base", "lora")]["ties"] == 2 and rows[("base", "lora")]["both_bad"] == 2


# ----------------------------------------------------------------------------- store, sources, pairing


def test_vote_store_is_wal_and_append_only(tmp_path):
    store = VoteStore(tmp_path / "v.sqlite")
    row = dict(source_a_id="0.x", source_b_id="0.y", rater="r", source_a="x", source_b="y", image_a="/a.png",
               image_b="/b.png", prompt="p", seed=1, pair_id="abc", shown="BA", answer="tie")
    nonce = store.issue("abc", "0.x", "0.y")
    with pytest.raises(ValueError):
        store.add(**{**row, "answer": "left"}, nonce=nonce)
    with pytest.raises(NonceError):  # issued for another pair
        store.add(**{**row, "pair_id": "abd"}, nonce=nonce)
    vid = store.add(**row, nonce=nonce)
    with pytest.raises(NonceError, match="already voted"):
        store.add(**row, nonce=nonce)
    with pytest.raises(NonceError, match="not offered"):
        store.add(**row, nonce="0123456789abcdef")
    store.close()
    conn = sqlite3.connect(tmp_path / "v.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    for sql in ("UPDATE votes SET answer = 'A'", "DELETE FROM votes"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute(sql)
    assert conn.execute("SELECT id, shown, answer FROM votes").fetchall() == [(vid, "BA", "tie")]


def test_metrics_tail_reads_only_complete_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(metric_line(1) + metric_line(2) + '{"step": 3, "lo')
    tail = MetricsTail(path)
    assert [r["step"] for r in tail.refresh()] == [1, 2]
    with open(path, "a") as f:
        f.write('ss": 0.5}\n' + metric_line(4))
    assert [r["step"] for r in tail.refresh()] == [1, 2, 3, 4]
    path.write_text(metric_line(9))  # replaced (a new run in the same file): start over
    assert [r["step"] for r in tail.refresh()] == [9] and tail.gen == 1
    # Replaced by a longer file, in place or by a rename: read again from its start, never from the old offset.
    path.write_text("".join(metric_line(s) for s in range(101, 120)))
    assert [r["step"] for r in tail.refresh()] == list(range(101, 120)) and tail.gen == 2
    new = tmp_path / "new.jsonl"
    new.write_text("".join(metric_line(s) for s in range(201, 240)))
    os.replace(new, path)
    assert [r["step"] for r in tail.refresh()] == list(range(201, 240)) and tail.gen == 3


def test_metrics_tail_turns_non_finite_values_into_gaps_and_lists_bad_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(metric_line(1) + json.dumps({"step": 2, "loss": 0.1, "grad_norm": float("nan"),
                                                 "val_loss": float("inf")}) + "\n"
                    + '{"step": 3, "loss": 1e999}\n' + "not json\n" + "[1, 2]\n" + metric_line(4))
    tail = MetricsTail(path)
    recs = tail.refresh()
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert recs[1]["grad_norm"] is None and recs[1]["val_loss"] is None and recs[2]["loss"] is None
    json.dumps(recs, allow_nan=False)  # what Starlette's JSONResponse requires
    assert [(p["kind"], p["line"]) for p in tail.problems] == [("non-finite", 2), ("non-finite", 3), ("skipped", 4),
                                                               ("skipped", 5)]
    assert tail.bad_lines == 2


def test_pairs_need_same_prompt_and_seed():
    def src(sid, items):
        return Source(sid, sid, "images", tuple(Item("0", f"{sid}/{k}.png", p, s) for k, (p, s) in enumerate(items)))

    a = src("a", [("cat", 1), ("cat", 2), ("dog", 1)])
    b = src("b", [("cat", 2), ("dog", 1), ("dog", 5), ("cow", 1)])
    got = {(x.prompt, x.seed, y.seed) for x, y in ((p.a, p.b) for p in match(a, b))}
    assert got == {("cat", 2, 2), ("dog", 1, 1)}  # cat/1 has no partner; dog/5 and cow never pair
    photos = src("photos", [("dog", None), ("cat", None)])
    got = {(x.prompt, x.seed, y.seed) for x, y in ((p.a, p.b) for p in match(photos, a))}
    assert got == {("dog", None, 1), ("cat", None, 1)}
    assert match(a, a) == []


def test_sources_from_run_and_generate_folders(folders, tmp_path):
    from mlx_sd.studio.sources import Catalog

    cat = Catalog(open_roots(folders))
    by_name = {s.name: s for s in cat.sources()}
    assert set(by_name) == {"run step 100", "run step 200", "run step 300", "base", "lora"}
    step = by_name["run step 200"]
    assert {(i.prompt, i.seed) for i in step.items} == {(p, 42 + 1000 * k + i) for k, p in enumerate(PROMPTS)
                                                        for i in range(2)}
    pairs = cat.pairs(by_name["base"], by_name["lora"])
    assert len(pairs) == 4 and all(p.a.rel == p.b.rel for p in pairs)
    # Real photos (a training set: images/ + captions.json as a list of records, no seeds) pair on the caption.
    photos = tmp_path / "photos"
    (photos / "images").mkdir(parents=True)
    for k, prompt in enumerate(PROMPTS):
        Image.new("RGB", (16, 16)).save(photos / "images" / f"real{k}.jpg")
    (photos / "images" / "captions.json").write_text(json.dumps(
        [{"file_name": f"real{k}.jpg", "text": p} for k, p in enumerate(PROMPTS)] + [{"file_name": "gone.png",
                                                                                      "text": "x"}]))
    cat = Catalog(open_roots([photos, folders[2]]))
    real, lora = cat.sources()
    assert [(i.rel, i.seed) for i in real.items] == [("images/real0.jpg", None), ("images/real1.jpg", None)]
    assert sorted((p.a.prompt, p.b.seed) for p in cat.pairs(real, lora)) == [(PROMPTS[0], 0), (PROMPTS[1], 1000)]
    # A folder of runs (runs/) opens every run inside it.
    parent = tmp_path / "runs"
    make_run(parent / "r8")
    make_run(parent / "r16")
    (parent / "notes").mkdir()
    assert [(r.name, r.is_run) for r in open_roots([parent])] == [("runs/r16", True), ("runs/r8", True)]
    with pytest.raises(ValueError, match="neither a training run"):
        open_roots([parent / "notes"])


def test_seed_is_read_from_what_generate_writes(tmp_path):
    """The PNG text mlx-sd-generate writes (its own function, not a copy) gives the studio the image's seed."""
    import argparse

    from mlx_sd.generate import Job, _parameters
    from mlx_sd.pipeline import save_png
    from mlx_sd.studio.sources import _png_seed

    args = argparse.Namespace(negative_prompt="blurry", steps=25, sampler="dpm++2m", guidance_scale=7.5, width=64,
                              height=64, model="models/sd15", lora=["a.safetensors:0.8"], dtype="float16")
    path = tmp_path / "x.png"
    save_png(Image.new("RGB", (8, 8)), path, _parameters(Job("x.png", "a shoe", 3141592653, 0, 0), args))
    assert _png_seed(path) == 3141592653
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert _png_seed(tmp_path / "plain.png") is None


def test_safe_path(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "ok.png").write_bytes(b"x")
    (tmp_path / "secret.png").write_bytes(b"s")
    os.symlink(tmp_path / "secret.png", root / "out.png")
    assert safe_path(root, "ok.png") == root / "ok.png"
    for bad in ("../secret.png", "a/../../secret.png", "/etc/passwd", ""):
        with pytest.raises(ValueError):
            safe_path(root, bad)
    with pytest.raises(PermissionError):
        safe_path(root, "out.png")
    with pytest.raises(FileNotFoundError):
        safe_path(root, "missing.png")


# ----------------------------------------------------------------------------- the running server


def test_server_refuses_paths_outside_folders(studio, folders, tmp_path):
    (tmp_path / "secret.png").write_bytes(b"secret")
    os.symlink(tmp_path / "secret.png", folders[0] / "validation" / "escape.png")
    ok = "/files/0/validation/epoch001_step0100_prompt0_img0.png"
    assert studio.request("GET", ok)[0] == 200
    refused = {
        "/files/0/../secret.png": 400,
        "/files/0/validation/../../secret.png": 400,
        "/files/0/%2e%2e/secret.png": 400,
        "/files/0//etc/passwd": 400,
        f"/files/0/{tmp_path}/secret.png": 400,
        "/files/0/validation/escape.png": 403,
        "/files/0/logs/20260101-120000/metrics.jsonl": 404,  # only images are served
        "/files/9/x.png": 404,
    }
    got = {p: studio.request("GET", p)[0] for p in refused}
    assert got == refused
    assert all(b"secret" not in studio.request("GET", p)[1] for p in refused)


def test_server_rejects_bad_votes_and_stores_nothing(studio, tmp_path):
    sources = {s["name"]: s["id"] for s in studio.json("/api/sources")}
    a, b = sources["base"], sources["lora"]
    nxt = studio.json(f"/api/ab/next?a={a}&b={b}&rater=t")
    good = {"a": a, "b": b, "pair": nxt["pair"], "nonce": nxt["nonce"], "answer": "left", "rater": "t"}
    bad = [
        ({**good, "pair": "0123456789abcdef"}, 400),
        ({**good, "answer": "A"}, 400),
        ({**good, "answer": None}, 400),
        ({**good, "rater": ""}, 400),
        ({**good, "nonce": "../x"}, 400),
        ({**good, "b": "9.images"}, 400),
        ({**good, "b": a}, 400),
        ({**good, "pair": [nxt["pair"]]}, 400),  # was a 500 (unhashable)
        ({**good, "pair": {"x": 1}}, 400),
        ({**good, "a": [a]}, 400),
        ({**good, "nonce": "0123456789abcdef"}, 400),  # a nonce this server never issued
        ("[1, 2]", 400),
        ("{not json", 400),
        (b'{"answer": "\xff"}', 400),
    ]
    for body, status in bad:
        headers = {"Content-Type": "application/json"}
        assert studio.request("POST", "/api/ab/vote", body, headers)[0] == status, body
    assert studio.request("POST", "/api/ab/vote", json.dumps(good), {"Content-Type": "text/plain"})[0] == 415
    assert studio.request("GET", "/files/0/" + "x" * 300 + ".png")[0] == 400  # ENAMETOOLONG, was a 500
    assert studio.json("/api/ab/results")["votes"] == 0
    status, data = studio.request("POST", "/api/ab/vote", good)
    assert status == 200
    vote = json.loads(data)
    # The same vote again (a double click, a replay) is refused: one row per pair shown.
    assert [studio.request("POST", "/api/ab/vote", good)[0] for _ in range(2)] == [409, 409]
    assert {vote["left"], vote["right"]} == {"base", "lora"}
    status, data = studio.request("GET", "/api/ab/votes.csv")
    exported = list(csv.DictReader(io.StringIO(data.decode())))
    assert status == 200 and len(exported) == 1
    assert exported[0]["rater"] == "t" and exported[0]["pair_id"] == nxt["pair"]
    assert exported[0]["winner"] == ("base" if exported[0]["answer (A: source_a, B: source_b)"] == "A" else "lora")
    rows = sqlite3.connect(tmp_path / "votes.sqlite").execute("SELECT source_a, source_b, shown, answer FROM votes")
    rows = rows.fetchall()
    assert len(rows) == 1
    source_a, source_b, shown, answer = rows[0]
    assert (source_a, source_b) == ("base", "lora")
    assert answer == ("A" if shown == "AB" else "B") and vote["left"] == ("base" if shown == "AB" else "lora")


def test_concurrent_votes_over_http_are_all_stored(tmp_path):
    """8 clients x 25 votes at once (bounded, loopback only): every vote lands exactly once."""
    from concurrent.futures import ThreadPoolExecutor

    folders = [make_generated(tmp_path / "x", (0, 0, 255), n=13), make_generated(tmp_path / "y", (9, 9, 9), n=13)]
    studio = Studio(folders, tmp_path / "votes.sqlite")
    sources = {s["name"]: s["id"] for s in studio.json("/api/sources")}
    a, b = sources["x"], sources["y"]

    def client(k):
        stored = []
        for j in range(25):
            nxt = studio.json(f"/api/ab/next?a={a}&b={b}&rater=c{k}")
            body = {"a": a, "b": b, "pair": nxt["pair"], "nonce": nxt["nonce"], "rater": f"c{k}",
                    "answer": ("left", "right", "tie", "both_bad")[(k + j) % 4]}
            status, data = studio.request("POST", "/api/ab/vote", body)
            assert status == 200, data
            stored.append(json.loads(data)["id"])
        return stored

    try:
        with ThreadPoolExecutor(8) as pool:
            ids = [i for got in pool.map(client, range(8)) for i in got]
    finally:
        studio.kill()
    rows = sqlite3.connect(tmp_path / "votes.sqlite").execute("SELECT id, rater FROM votes").fetchall()
    assert sorted(ids) == sorted(r[0] for r in rows) and len(set(ids)) == 200
    assert all(sum(1 for r in rows if r[1] == f"c{k}") == 25 for k in range(8))


def vm_kib(pid: int, key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))


def raw_post(studio, path: str, length: int | None, body: bytes, content_type="application/json") -> tuple[str, float]:
    """POST with a chosen Content-Length, the body pushed from a thread; (status line, seconds to the answer)."""
    import socket
    import threading

    conn = socket.create_connection((studio.host, studio.port))
    conn.settimeout(20)
    size = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
    head = (f"POST {path} HTTP/1.1\r\nHost: {studio.host}:{studio.port}\r\nContent-Type: {content_type}\r\n"
            f"{size}\r\n\r\n").encode()

    def push():
        try:
            conn.sendall(head)
            for k in range(0, len(body), 1 << 20):
                conn.sendall(body[k:k + (1 << 20)])
        except OSError:  # the server answered and closed: what a bounded server does
            pass

    threading.Thread(target=push, daemon=True).start()
    t = time.monotonic()
    try:
        line = conn.recv(200).split(b"\r\n")[0].decode()
    except TimeoutError:
        line = "no answer"
    conn.close()
    return line, time.monotonic() - t


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from /proc")
def test_request_bodies_are_bounded(studio, tmp_path):
    """A 50 MB vote, a 10 GB Content-Length and a chunked 50 MB body are refused (413) before being read: no row,
    no memory growth."""
    sources = {s["name"]: s["id"] for s in studio.json("/api/sources")}
    a, b = sources["base"], sources["lora"]
    nxt = studio.json(f"/api/ab/next?a={a}&b={b}&rater=t")
    vote = {"a": a, "b": b, "pair": nxt["pair"], "nonce": nxt["nonce"], "answer": "left", "rater": "t"}
    peak = vm_kib(studio.proc.pid, "VmHWM")
    big = json.dumps({**vote, "pad": "x" * 50_000_000}).encode()
    line, _ = raw_post(studio, "/api/ab/vote", len(big), big)
    assert " 413 " in line, line
    line, seconds = raw_post(studio, "/api/ab/vote", 10_000_000_000, b"{}")
    assert " 413 " in line and seconds < 5, (line, seconds)
    chunk = b"x" * (1 << 20)  # no Content-Length at all: 50 chunks of 1 MB, refused once 16 KB are in
    line, _ = raw_post(studio, "/api/ab/vote", None, (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 50 + b"0\r\n\r\n")
    assert " 413 " in line, line
    grown = (vm_kib(studio.proc.pid, "VmHWM") - peak) / 1024
    assert grown < 10, f"peak RSS grew {grown:.0f} MiB"  # reading the 50 MB body grew it by ~140 MiB
    assert studio.json("/api/ab/results")["votes"] == 0
    assert studio.request("POST", "/api/ab/vote", vote)[0] == 200  # the server still answers, the nonce unused


def test_undo_skip_and_all_pairs_rated(studio, tmp_path):
    sources = {s["name"]: s["id"] for s in studio.json("/api/sources")}
    a, b = sources["base"], sources["lora"]
    seen, nonces = [], []
    for k in range(4):  # base and lora share 4 pairs
        nxt = studio.json(f"/api/ab/next?a={a}&b={b}&rater=ana")
        assert nxt["rated"] == k and nxt["total"] == 4
        skip = studio.json(f"/api/ab/next?a={a}&b={b}&rater=ana&skip={nxt['pair']}")
        if 4 - k > 1:
            assert skip["pair"] != nxt["pair"]  # skipping offers another pair
        seen.append(nxt["pair"])
        nonces.append(nxt["nonce"])
        vote = {"a": a, "b": b, "pair": nxt["pair"], "nonce": nxt["nonce"], "answer": "tie", "rater": "ana"}
        assert studio.request("POST", "/api/ab/vote", vote)[0] == 200
    assert len(set(seen)) == 4
    done = studio.json(f"/api/ab/next?a={a}&b={b}&rater=ana")
    assert done["pair"] is None and done["done"] and "all 4 pairs" in done["reason"]
    status, data = studio.request("POST", "/api/ab/undo", {"nonce": nonces[-1]})
    assert status == 200 and json.loads(data)["votes"] == 3
    assert studio.request("POST", "/api/ab/undo", {"nonce": nonces[-1]})[0] == 409
    assert studio.request("POST", "/api/ab/undo", {"nonce": "0123456789abcdef"})[0] == 404
    again = studio.json(f"/api/ab/next?a={a}&b={b}&rater=ana")
    assert again["pair"] == seen[-1]  # the undone pair is offered again
    assert studio.json("/api/ab/results?rounds=0")["votes"] == 3
    rows = list(csv.DictReader(io.StringIO(studio.request("GET", "/api/ab/votes.csv")[1].decode())))
    assert len(rows) == 4 and [bool(r["undone"]) for r in rows] == [False, False, False, True]


def test_csv_cells_that_would_run_as_formulas_are_escaped(studio):
    sources = {s["name"]: s["id"] for s in studio.json("/api/sources")}
    a, b = sources["base"], sources["lora"]
    for rater in ('=HYPERLINK("http://example.com","x")', "+1", "-1", "@SUM(A1)", "plain"):
        nxt = studio.json(f"/api/ab/next?a={a}&b={b}&rater=r")
        vote = {"a": a, "b": b, "pair": nxt["pair"], "nonce": nxt["nonce"], "answer": "right", "rater": rater}
        assert studio.request("POST", "/api/ab/vote", vote)[0] == 200
    rows = list(csv.DictReader(io.StringIO(studio.request("GET", "/api/ab/votes.csv")[1].decode())))
    assert [r["rater"] for r in rows] == ["'=HYPERLINK(\"http://example.com\",\"x\")", "'+1", "'-1", "'@SUM(A1)",
                                          "plain"]


def test_a_symlink_out_of_the_folder_is_never_offered(folders, tmp_path):
    base = folders[1]
    (tmp_path / "outside.png").write_bytes((base / "images" / "prompt00000_img000.png").read_bytes())
    os.symlink(tmp_path / "outside.png", base / "images" / "link.png")
    os.symlink(tmp_path / "outside.png", folders[0] / "validation" / "epoch009_step0900_prompt0_img0.png")
    caps = json.loads((base / "captions.json").read_text())
    (base / "captions.json").write_text(json.dumps({"link.png": PROMPTS[0], **caps}))
    s = Studio(folders, tmp_path / "v.sqlite")
    try:
        sources = {x["name"]: x for x in s.json("/api/sources")}
        assert sources["base"]["count"] == 4 and "run step 900" not in sources
        a, b = sources["base"]["id"], sources["lora"]["id"]
        for _ in range(12):
            nxt = s.json(f"/api/ab/next?a={a}&b={b}&rater=t")
            assert s.request("GET", nxt["left"])[0] == 200 and s.request("GET", nxt["right"])[0] == 200
        assert all(im["step"] != 900 for im in s.json("/api/timeline?root=0")["images"])
    finally:
        s.kill()


def test_metrics_with_nan_and_a_replaced_file_over_http(studio, folders):
    metrics = folders[0] / "logs" / "20260101-120000" / "metrics.jsonl"
    run = "0/20260101-120000"
    first = studio.json(f"/api/metrics?run={run}")
    assert first["total"] == 7 and first["gen"] == 0
    with open(metrics, "a") as f:
        f.write(json.dumps({"step": 8, "loss": 0.1, "grad_norm": float("nan")}) + "\n{broken\n")
    d = studio.json(f"/api/metrics?run={run}&from=7&gen=0")
    assert [r["step"] for r in d["records"]] == [8] and d["records"][0]["grad_norm"] is None
    assert [p["kind"] for p in d["problems"]] == ["non-finite", "skipped"]
    metrics.write_text("".join(metric_line(s) for s in range(101, 131)))
    d = studio.json(f"/api/metrics?run={run}&from=8&gen=0")
    assert d["gen"] == 1 and d["from"] == 0 and [r["step"] for r in d["records"]] == list(range(101, 131))
    status, data = studio.request("GET", f"/api/metrics.csv?run={run}")
    lines = data.decode().splitlines()
    assert status == 200 and lines[0].startswith("step,epoch,loss") and len(lines) == 31


def test_cli_names_a_port_in_use_and_reachable_addresses(folders, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "mlx_sd.studio", str(folders[0]), "--port", str(port), "--db",
                            str(tmp_path / "v.sqlite")], check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and f"port {port} on 127.0.0.1 is already in use" in r.stderr and "--port" in r.stderr
    s = Studio(folders, tmp_path / "v.sqlite", "--host", "0.0.0.0")
    try:
        text = "".join(s.output)
        assert "0.0.0.0:" not in text.split("listening")[-1].replace("(0.0.0.0)", "")
        from mlx_sd.studio.server import reachable_addresses

        assert s.host != "0.0.0.0" and (s.host in reachable_addresses(socket.AF_INET) or "no address" in text)
        token = re.search(r"token=([\w-]+)", s.url).group(1)
        assert s.request("GET", "/api/sources", headers={"X-Studio-Token": token})[0] == 200
    finally:
        s.kill()


def test_blind_images_follow_the_hidden_placement(studio):
    sources = {s["name"]: s["id"] for s in studio.json("/api/sources")}
    a, b = sources["base"], sources["lora"]
    seen = set()
    for _ in range(12):
        nxt = studio.json(f"/api/ab/next?a={a}&b={b}&rater=t")
        assert "base" not in nxt["left"] + nxt["right"] and "lora" not in nxt["left"] + nxt["right"]
        colors = []
        for side in ("left", "right"):
            status, data = studio.request("GET", nxt[side])
            assert status == 200
            colors.append(Image.open(io.BytesIO(data)).getpixel((0, 0)))
        assert sorted(colors) == [(0, 0, 255), (255, 0, 0)]
        seen.add(tuple(colors))
    assert len(seen) == 2  # both placements occur (probability 1 - 2 * 2^-12 that a fair placement shows both)


def test_token_required_off_loopback_address(folders, tmp_path):
    # 127.0.0.2 is still this machine, but not the default address: the studio must ask for a token.
    s = Studio(folders, tmp_path / "v.sqlite", "--host", "127.0.0.2")
    try:
        token = re.search(r"token=([\w-]+)", s.url).group(1)
        assert s.request("GET", "/api/sources")[0] == 401
        assert s.request("GET", "/api/sources?token=wrong")[0] == 401
        assert s.request("GET", "/files/0/validation/epoch001_step0100_prompt0_img0.png")[0] == 401
        assert s.request("GET", "/api/sources", headers={"X-Studio-Token": token})[0] == 200
        conn = http.client.HTTPConnection(s.host, s.port, timeout=30)
        conn.request("GET", f"/runs?token={token}")
        r = conn.getresponse()
        r.read()
        cookie = r.getheader("set-cookie").split(";")[0]
        assert r.status == 200 and "HttpOnly" in r.getheader("set-cookie")
        assert s.request("GET", "/api/sources", headers={"Cookie": cookie})[0] == 200
    finally:
        s.kill()


def test_loopback_server_refuses_foreign_host_header(studio):
    # A page on another site that rebinds its DNS name to 127.0.0.1 sends its own Host header.
    assert studio.request("GET", "/api/sources", headers={"Host": f"evil.example:{studio.port}"})[0] == 400
    assert studio.request("GET", "/api/sources")[0] == 200


def test_cli_refuses_a_folder_that_is_neither(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mlx_sd.studio", str(tmp_path), "--port", "0"],
                       check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "neither a training run" in r.stderr
