"""Aspect-ratio buckets (--enable_bucket): the table, the assignment, batching, caching, resume, ranks.

The table and assignment are checked against kohya sd-scripts' rules (mlx_sd.buckets' docstring)
at SD1.5's real settings (512 px, 256..1024, steps of 64); training runs use the tiny fixture at
128 px with buckets 64..256, whose table is 64x192, 64x256, 128x128, 192x64, 256x64.
"""

import contextlib
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import train
from mlx_sd.buckets import BucketPlan, Buckets, bucket_sizes, check_flags
from mlx_sd.checkpoint import latest_checkpoint
from mlx_sd.data import EncodedData, cover_crop, oriented_size, preprocess
from mlx_sd.train_options import parse_args
from test_training import COLORS, NAMES, ROOT, run_train

# (width, height): portrait, landscape, square, 1:4, 4:1, 1:3, 3:1, beyond the table (1:10, 10:1).
MIXED = [(96, 128), (128, 96), (128, 128), (64, 256), (256, 64), (64, 192), (192, 64), (40, 400), (400, 40),
         (130, 120)]


def make_mixed(root: Path, sizes=MIXED) -> Path:
    """Coloured blobs on white at the given sizes, with captions (images/ + captions.json)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    caps = {}
    for i, (w, h) in enumerate(sizes):
        im = Image.new("RGB", (w, h), "white")
        d = ImageDraw.Draw(im)
        d.ellipse([w // 8, h // 3, w - w // 8, h - h // 8], fill=COLORS[i % len(COLORS)])
        d.rectangle([w // 3, h // 6, w - w // 4, h // 2], fill=COLORS[(i + 2) % len(COLORS)])
        name = f"img{i:02d}_{w}x{h}.png"
        im.save(root / "images" / name)
        caps[name] = f"a product photo of {NAMES[i % len(NAMES)]} casual shoes on white background"
    (root / "captions.json").write_text(json.dumps(caps))
    return root


def test_bucket_table_follows_the_rules():
    res, lo, hi, step = 512, 256, 1024, 64
    table = bucket_sizes(res, lo, hi, step)
    print("buckets at 512 px:", table)
    assert table == sorted(set(table)) and (512, 512) in table
    for w, h in table:
        assert w % step == 0 and h % step == 0 and lo <= min(w, h) and max(w, h) <= hi, (w, h)
        assert w * h <= res * res, (w, h)
        assert (h, w) in table  # portrait and landscape alike
        # The tallest height that fits the area (or the cap) for its width, or the transpose of one.
        assert (h == hi or w * (h + step) > res * res) or (w == hi or (w + step) * h > res * res), (w, h)
    widths = {w for w, _ in table}
    # Every width from min to max whose tallest fitting height reaches min_reso has its bucket.
    assert widths == {w for w in range(lo, hi + 1, step) if min(hi, res * res // w // step * step) >= lo}
    # Extremes: the widest and the tallest buckets are 4:1 and 1:4 at these settings.
    assert (1024, 256) in table and (256, 1024) in table


def test_each_image_goes_to_the_bucket_nearest_its_ratio(tmp_path):
    sizes = [(768, 1024), (1024, 768), (600, 600), (256, 1024), (1024, 256), (300, 3000), (3000, 300),
             (832, 256), (640, 384)]
    data = make_mixed(tmp_path / "d", [(w // 8, h // 8) for w, h in sizes])  # same ratios, small files
    paths = sorted((data / "images").iterdir())
    b = Buckets.of_files(paths, 512, 256, 1024, 64)
    full = bucket_sizes(512, 256, 1024, 64)
    ratios = np.array([w / h for w, h in full])
    for p, (bw, bh) in zip(paths, b.sizes()):
        w, h = oriented_size(p)
        err = abs(bw / bh - w / h)
        assert err <= np.abs(ratios - w / h).min() + 1e-12, (p.name, (bw, bh))
        (nw, nh), (left, top, right, bottom) = cover_crop((w, h), (bw, bh))
        assert nw >= bw and nh >= bh and (nw == bw or nh == bh), (p.name, nw, nh)  # covers, one side exact
        assert (right - left, bottom - top) == (bw, bh) and left == (nw - bw) // 2 and top == (nh - bh) // 2
    got = dict(zip([p.name.split("_")[1] for p in paths], b.sizes()))
    print("assignment:", got)
    assert got["96x128.png"] == (448, 576) and got["128x96.png"] == (576, 448)
    assert got["75x75.png"] == (512, 512)
    assert got["32x128.png"] == (256, 1024) and got["128x32.png"] == (1024, 256)
    assert got["37x375.png"] == (256, 1024) and got["375x37.png"] == (1024, 256)  # beyond the table: the extreme
    assert got["104x32.png"] == (832, 256)  # exactly a bucket's ratio
    # An image with its own size in the table goes there, not to another bucket of a near ratio.
    assert Buckets([(640, 384)], 512, 256, 1024, 64).table == [(640, 384)]
    # EXIF orientation 6 (rotated 90 degrees): the portrait seen by training, not the stored landscape.
    im = Image.new("RGB", (200, 100), "white")
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "rot.jpg", exif=exif)
    assert oriented_size(tmp_path / "rot.jpg") == (100, 200)
    assert preprocess(tmp_path / "rot.jpg", 64, size=(64, 128)).shape == (128, 64, 3)


def test_printed_table_and_plan():
    b = Buckets([(64, 192)] * 5 + [(100, 100)] * 2 + [(190, 60)], 128, 64, 256, 64)
    assert b.table == [(64, 192), (128, 128), (192, 64)]  # only the buckets in use
    of = b.of
    assert of.tolist() == [0] * 5 + [1] * 2 + [2]
    lines = b.describe(2)
    print("\n".join(lines))
    assert lines[2].split()[:6] == ["64", "x", "192", "0.33", "5", "3"] and "(1 image(s)" in lines[2]
    assert lines[-1].split()[1:3] == ["8", "5"]  # 8 images, 3 + 1 + 1 micro-batches per epoch

    plan = BucketPlan(of, 2, seed=5, flip=True)
    assert plan.groups_per_epoch == 5 and plan.epoch_samples == 10
    for epoch in range(4):
        batches = [plan(epoch * 5 + j) for j in range(5)]
        assert all(e == epoch for e, _, _ in batches)
        seen = np.concatenate([idx for _, idx, _ in batches])
        assert set(seen.tolist()) == set(range(8))  # every image at least once per epoch
        for _, idx, _ in batches:
            assert len(set(of[idx].tolist())) == 1, idx  # one bucket per batch
        assert len(seen) - 8 == 2  # the refills: one slot in bucket 0 (5 images), one in bucket 2 (1 image)
    # A pure function of (seed, c): another plan asked in another order answers the same.
    other = BucketPlan(of, 2, seed=5, flip=True)
    for c in (17, 3, 9, 0, 17):
        a, b2 = plan(c), other(c)
        assert a[0] == b2[0] and np.array_equal(a[1], b2[1]) and np.array_equal(a[2], b2[2])
    assert not all(np.array_equal(plan(c)[1], BucketPlan(of, 2, seed=6, flip=True)(c)[1]) for c in range(10))


def test_flag_checks(tiny_mlx_dir, tmp_path, capsys):
    base = ["--train_data_dir", "x", "--enable_bucket"]
    assert parse_args(base).enable_bucket
    for extra, msg in ((["--min_bucket_reso", "576"], "--resolution 512 must lie between"),
                       (["--max_bucket_reso", "448"], "--resolution 512 must lie between"),
                       (["--min_bucket_reso", "200"], "--min_bucket_reso 200 is not a multiple of"),
                       (["--bucket_reso_steps", "60"], "--bucket_reso_steps 60 is not a multiple of 8"),
                       (["--validation_width", "100"], "--validation_width 100 is not a multiple of 8")):
        with pytest.raises(SystemExit):
            parse_args(base + extra)
        assert msg in capsys.readouterr().err, extra
    assert check_flags(512, 256, 1024, 64) is None
    data = make_mixed(tmp_path / "d", MIXED[:3])
    rc = run_train("--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", data, "--output_dir",
                   tmp_path / "o", "--resolution", 128, "--enable_bucket", "--min_bucket_reso", 64,
                   "--max_bucket_reso", 256, "--bucket_reso_steps", 32, "--max_train_steps", 1, "--no_validation")
    assert rc == 2 and "--bucket_reso_steps 32: this model needs a multiple of 64" in capsys.readouterr().err


BUCKETS = ["--resolution", 128, "--enable_bucket", "--min_bucket_reso", 64, "--max_bucket_reso", 256]
COMMON = [*BUCKETS, "--train_batch_size", 2, "--gradient_accumulation_steps", 2, "--random_flip",
          "--lr_scheduler", "cosine", "--lr_warmup_steps", 2, "--learning_rate", 1e-3, "--lora_dropout", 0.1,
          "--no_validation", "--seed", 11, "--max_train_steps", 6, "--checkpointing_steps", 3]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_mixed(tmp_path_factory.mktemp("buckets") / "data")


def _metrics(out: Path) -> dict[int, dict]:
    recs = {}
    for d in sorted((out / "logs").iterdir()):
        f = d / "metrics.jsonl"
        for line in f.read_text().splitlines() if f.exists() else []:
            r = json.loads(line)
            recs[r["step"]] = r
    return recs


def _adapter(out: Path) -> dict[str, np.ndarray]:
    import mlx.core as mx

    return {k: np.array(v) for k, v in mx.load(str(out / "lora_weights" / "adapter_model.safetensors")).items()}


@pytest.fixture(scope="module")
def straight(tiny_mlx_dir, dataset, tmp_path_factory):
    """One uninterrupted bucketed run; every micro-batch's shapes are recorded."""
    out = tmp_path_factory.mktemp("straight") / "run"
    shapes = []
    real = train.CachedBatches.__call__

    def spy(self, c):
        epoch, mean, std, ctx = real(self, c)
        _, idx, _ = self.plan(c)
        shapes.append((c, tuple(mean.shape), tuple(std.shape), idx.tolist()))
        return epoch, mean, std, ctx

    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setattr(train.CachedBatches, "__call__", spy)
        assert run_train("--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", dataset,
                         "--output_dir", out, *COMMON) == 0
    return out, shapes, printed.getvalue()


def test_bucketed_run_batches_one_bucket_each_and_caches_per_bucket(straight, dataset):
    out, shapes, printed = straight
    print(printed)
    table_lines = printed.split("aspect-ratio buckets (5 used; batches of 2 per device):\n")[1].splitlines()
    assert [line.split()[:6] for line in table_lines[1:7]] == [
        ["64", "x", "192", "0.33", "1", "1"], ["64", "x", "256", "0.25", "2", "1"],
        ["128", "x", "128", "1.00", "4", "2"], ["192", "x", "64", "3.00", "1", "1"],
        ["256", "x", "64", "4.00", "2", "1"], ["total", "10", "6", "batches", "per", "epoch"]]
    enc = np.load(next((out / "cache").glob("encoded-*.npz")))
    data = EncodedData.from_arrays(enc)
    table = [tuple(s) for s in data.bucket_size]
    print("cached buckets:", table, "counts", np.bincount(data.bucket).tolist())
    assert table == [(64, 192), (64, 256), (128, 128), (192, 64), (256, 64)]
    names = sorted(p.name for p in (dataset / "images").iterdir())
    for k, (w, h) in enumerate(table):
        rows = int((data.bucket == k).sum())
        for name in ("mean", "std", "mean_flip", "std_flip"):
            assert enc[f"{name}.{k}"].shape == (rows, h // 8, w // 8, 4)
    for i, name in enumerate(names):  # geometry recorded per image, as kohya records it
        w, h = map(int, name.split("_")[1][:-4].split("x"))
        assert tuple(data.original_size[i]) == (w, h)
        bw, bh = table[data.bucket[i]]
        (nw, nh), box = cover_crop((w, h), (bw, bh))
        assert tuple(data.crop_ltrb[i]) == box and box[2] <= nw and box[3] <= nh
    assert "mean" not in enc.files  # no square latents at all
    # 6 updates x 2 micro-batches (two epochs of 6 batches), every one a single bucket.
    assert [c for c, *_ in shapes] == list(range(12))
    for c, mean_shape, std_shape, idx in shapes:
        assert len({data.bucket[i] for i in idx}) == 1, (c, idx)
        w, h = table[data.bucket[idx[0]]]
        assert mean_shape == std_shape == (2, h // 8, w // 8, 4), (c, mean_shape)
    assert len({s for _, s, _, _ in shapes}) >= 3  # the run really alternated between shapes


def test_uncached_buckets_give_the_cached_losses(straight, tiny_mlx_dir, dataset, tmp_path):
    out = straight[0]
    assert run_train("--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", dataset,
                     "--output_dir", tmp_path, *COMMON, "--max_train_steps", 3, "--no_cache") == 0
    a, b = _metrics(out), _metrics(tmp_path)
    print("cached", [a[s]["loss"] for s in (1, 2, 3)], "uncached", [b[s]["loss"] for s in (1, 2, 3)])
    np.testing.assert_allclose([b[s]["loss"] for s in (1, 2, 3)], [a[s]["loss"] for s in (1, 2, 3)], rtol=1e-4)


def test_sigkilled_bucketed_run_resumes_exactly(straight, tiny_mlx_dir, dataset, tmp_path):
    """Bit-identical: the killed subprocess inherits this process's environment, hence its BLAS thread count."""
    ref = straight[0]
    out = tmp_path / "run"
    args = ["--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", dataset, "--output_dir", out,
            *COMMON]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args), "--no_progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "checkpoint-3").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert int(latest_checkpoint(out / "checkpoints").name.split("-")[1]) >= 3
    assert run_train(*args, "--resume_from_checkpoint", "latest") == 0
    a, b = _adapter(ref), _adapter(out)
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k  # bit-identical
    want, got = _metrics(ref), _metrics(out)
    assert sorted(got) == list(range(1, 7))
    assert all(got[s]["loss"] == want[s]["loss"] and got[s]["lr"] == want[s]["lr"] for s in range(1, 7))


def test_validation_size_and_square_heldout_loss(tiny_mlx_dir, dataset, tmp_path):
    """--validation_width/height size the validation images; the held-out loss keeps square latents."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("black casual shoes\n")
    assert run_train("--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", dataset,
                     "--output_dir", tmp_path / "run", *BUCKETS, "--train_batch_size", 2, "--max_train_steps", 1,
                     "--validation_prompts", prompts, "--num_validation_images", 1, "--validation_inference_steps",
                     2, "--validation_width", 192, "--validation_height", 128, "--validation_split", 0.2) == 0
    images = sorted((tmp_path / "run" / "validation").glob("*_img0.png"))
    assert images and Image.open(images[0]).size == (192, 128)
    held = np.load(next((tmp_path / "run" / "cache").glob("encoded-heldout-*.npz")))
    assert held["mean"].shape[1:] == (16, 16, 4)  # 128 x 128: square, whatever the buckets
    assert "val_loss" in "".join((d / "metrics.jsonl").read_text() for d in (tmp_path / "run" / "logs").iterdir())


def test_two_ranks_train_what_one_process_trains_with_buckets(straight, tiny_mlx_dir, dataset, tmp_path):
    """mlx.launch, 2 ranks x batch 2 x accumulation 1 on loopback: the same updates (each device's batch one
    bucket) as 1 x batch 2 x accumulation 2. Ranks run with one BLAS thread each: compared within TOL."""
    from test_distributed import LAUNCHER, TOL, _train_cmd, adapter_difference, launch

    if not LAUNCHER.exists():
        pytest.skip("mlx.launch is not installed next to this python")
    ref = straight[0]
    out = tmp_path / "two"
    cmd = _train_cmd("--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", dataset, *COMMON,
                     "--gradient_accumulation_steps", 1, "--output_dir", out)
    log = launch(cmd)
    assert "done: 6 steps" in log and "global batch 2 x 1 accumulation x 2 ranks" in log, log
    assert log.count("aspect-ratio buckets (5 used; batches of 2 per device):") == 1  # printed by rank 0
    assert adapter_difference(ref / "lora_weights", out / "lora_weights",
                              "buckets: 2 ranks x 2 x 1 vs 1 x 2 x 2") <= TOL
    want, got = _metrics(ref), _metrics(out)
    assert sorted(got) == list(range(1, 7))
    np.testing.assert_allclose([got[s]["loss"] for s in range(1, 7)], [want[s]["loss"] for s in range(1, 7)],
                               rtol=1e-5)


def test_bucketed_resume_keeps_the_per_device_batch(straight, tiny_mlx_dir, dataset, tmp_path, capsys):
    """Buckets group each device's batch: a resume with another per-device batch is refused, even with the
    same global batch (1 x 4 instead of 2 x 2), with the setting named."""
    ck = straight[0] / "checkpoints" / "checkpoint-3"
    args = ["--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", dataset, *COMMON,
            "--resume_from_checkpoint", ck]
    assert run_train(*args, "--train_batch_size", 1, "--gradient_accumulation_steps", 4,
                     "--output_dir", tmp_path / "a") == 2
    assert "bucket_batch: checkpoint 2 vs now 1" in capsys.readouterr().err
