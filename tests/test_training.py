"""train.py end to end on the tiny fixture, the step's numerics, LR schedules, bad data."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image, ImageDraw

import train
from lora import LoRAConfig, inject_lora, lora_layers
from mlx_sd.data import read_captions, scan
from mlx_sd.model_folder import ModelFolder
from mlx_sd.schedulers import NoiseSchedule
from mlx_sd.training import LR_SCHEDULERS, LossConfig, TrainStep, lr_factor

ROOT = Path(__file__).resolve().parent.parent
COLORS = [(20, 20, 20), (120, 70, 30), (240, 240, 235), (40, 70, 200), (200, 40, 40), (60, 160, 80)]
NAMES = ["black", "brown", "white", "blue", "red", "green"]


def make_dataset(root: Path, n: int = 6, size: int = 128, extra: dict | None = None) -> Path:
    """Shoe-like blobs of different colours on white, with captions."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    caps = {}
    for i in range(n):
        im = Image.new("RGB", (size + 16 * (i % 2), size), "white")  # not all square
        d = ImageDraw.Draw(im)
        d.ellipse([10 + 3 * i, size // 3, size - 10, size - 20], fill=COLORS[i % len(COLORS)])
        d.rectangle([size // 2, size // 4, size - 20, size // 2], fill=COLORS[i % len(COLORS)])
        name = f"img{i:02d}.png"
        im.save(root / "images" / name)
        caps[name] = f"a product photo of {NAMES[i % len(NAMES)]} casual shoes on white background"
    caps.update(extra or {})
    (root / "captions.json").write_text(json.dumps(caps))
    return root


def run_train(*args):
    return train.main([str(a) for a in args] + ["--no_progress"])


BASE = ["--resolution", 128, "--train_batch_size", 2, "--lr_warmup_steps", 0, "--lr_scheduler", "constant",
        "--no_validation", "--checkpointing_steps", 0, "--seed", 3]


@pytest.mark.parametrize("name", LR_SCHEDULERS)
def test_lr_schedules_match_diffusers(name):
    import torch
    from diffusers.optimization import get_scheduler

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    kw = {"num_cycles": 2} if name == "cosine_with_restarts" else {}
    kw.update({"power": 2.0} if name == "polynomial" else {})
    ref = get_scheduler(name, opt, num_warmup_steps=10, num_training_steps=60, **kw)
    want = []
    for _ in range(70):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    f = lr_factor(name, 10, 60, num_cycles=kw.get("num_cycles"), power=kw.get("power", 1.0))
    got = [1e-4 * float(f(s)) for s in range(70)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)


def _deterministic_draws(schedule):
    """Per-sample noise/timesteps that depend only on that sample, so batchings are comparable."""
    def draw(lat, keys):
        noise = mx.sin(3.0 * lat + 1.0)
        t = (mx.abs(mx.sum(lat, axis=(1, 2, 3))) * 997).astype(mx.int32) % schedule.num_train_timesteps
        return noise, t
    return draw


def test_gradient_accumulation_equals_big_batch(tiny_mlx_dir):
    """Batch 4 x 1 and batch 1 x 4: the same mean gradient reaches the optimizer, the same update.

    Compared on the gradient (relative L2) and on the weights after one SGD update; AdamW's first
    step is ~lr * sign(g), which would magnify float32 summation-order noise in near-zero entries.
    """
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    folder = ModelFolder(tiny_mlx_dir)
    schedule = NoiseSchedule(folder.scheduler_config())
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((4, 16, 16, 4)).astype(np.float32)
    ctx = rng.standard_normal((4, 77, 32)).astype(np.float32)
    grads, weights = [], []
    for batch, accum in ((4, 1), (1, 4)):
        mx.random.seed(0)
        unet = folder.unet()
        inject_lora(unet, LoRAConfig(r=4, alpha=8))
        for layer in lora_layers(unet).values():  # non-zero B so every parameter gets a gradient
            layer.lora_B.weight = mx.random.normal(layer.lora_B.weight.shape) * 0.05
        step = TrainStep(unet, optim.SGD(learning_rate=0.1), schedule, LossConfig(), grad_accum=accum,
                         max_grad_norm=0, draw=_deterministic_draws(schedule), sample=lambda m, s, k: m)
        acc = step.zero_grads()
        for k in range(accum):
            sl = slice(k * batch, (k + 1) * batch)
            keys = mx.zeros((batch, 2), mx.uint32)  # unused by these draws
            _, acc = step.grad_step(mx.array(mean[sl]), mx.zeros((batch, 16, 16, 4)), mx.array(ctx[sl]), keys, acc)
        mx.eval(acc)
        grads.append(np.concatenate([np.array(v).ravel() / accum for _, v in tree_flatten(acc)]))
        step.apply_update(acc)
        mx.eval(unet.parameters())
        weights.append(np.concatenate([np.array(v).ravel() for _, v in tree_flatten(unet.trainable_parameters())]))
    g_rel = np.linalg.norm(grads[0] - grads[1]) / np.linalg.norm(grads[0])
    w_rel = np.abs(weights[0] - weights[1]).max() / np.abs(weights[0]).max()
    print(f"gradient relative L2 difference {g_rel:.2e}, weights after update {w_rel:.2e}")
    assert g_rel <= 1e-5 and w_rel <= 1e-5


def test_train_learns_and_exports(tiny_mlx_dir, tmp_path):
    data = make_dataset(tmp_path / "data", n=4)
    out = tmp_path / "run"
    assert run_train("--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", data, "--output_dir", out,
                     "--max_train_steps", 200, "--learning_rate", 1e-3, *BASE) == 0
    logs = sorted((out / "logs").iterdir())[-1]
    losses = [r["loss"] for r in map(json.loads, (logs / "metrics.jsonl").read_text().splitlines())]
    assert len(losses) == 200
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    print(f"mean loss first 20 steps {first:.4f}, last 20 {last:.4f}, ratio {last / first:.3f}")
    assert last < 0.7 * first
    for f in ("adapter_model.safetensors", "adapter_config.json", "pytorch_lora_weights.safetensors",
              "lora_kohya.safetensors"):
        assert (out / "lora_weights" / f).exists()
    assert (logs / "loss_curve.png").exists() and (logs / "config.json").exists()
    assert (out / "checkpoints" / "checkpoint-200").is_dir()

    # The adapter denoises the training images better than the base model (fixed noise and t).
    from lora.formats import apply_adapter, load_adapter
    folder = ModelFolder(tiny_mlx_dir)
    schedule = NoiseSchedule(folder.scheduler_config())
    enc = np.load(next((out / "cache").glob("encoded-*.npz")))
    lat = mx.array(enc["mean"]) * 0.18215
    ctx = mx.array(enc["text"][enc["caption_index"]])
    key = mx.random.key(123)
    noise = mx.random.normal(lat.shape, key=key)
    errs = []
    for with_adapter in (False, True):
        unet = folder.unet()
        if with_adapter:
            apply_adapter(unet, load_adapter(out / "lora_weights"))
        e = []
        for t in (50, 250, 500, 750, 950):
            ts = mx.full((lat.shape[0],), t, dtype=mx.int32)
            pred = unet(schedule.add_noise(lat, noise, ts), ts, ctx)
            e.append(mx.mean(mx.square(pred - noise)).item())
        errs.append(np.mean(e))
    print(f"denoising MSE base {errs[0]:.4f} vs adapter {errs[1]:.4f}")
    assert errs[1] < errs[0]


def test_cached_and_uncached_give_same_losses(tiny_mlx_dir, tmp_path):
    data = make_dataset(tmp_path / "data", n=4)
    common = ["--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", data, "--max_train_steps", 3,
              "--random_flip", *BASE]
    assert run_train(*common, "--output_dir", tmp_path / "cached") == 0
    assert run_train(*common, "--output_dir", tmp_path / "uncached", "--no_cache") == 0

    def losses(run):
        logs = sorted((tmp_path / run / "logs").iterdir())[-1]
        return [r["loss"] for r in map(json.loads, (logs / "metrics.jsonl").read_text().splitlines())]

    a, b = losses("cached"), losses("uncached")
    np.testing.assert_allclose(a, b, rtol=1e-4)
    assert not (tmp_path / "uncached" / "cache").exists()


def test_second_run_reuses_cache(tiny_mlx_dir, tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data", n=2)
    args = ["--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", data, "--output_dir", tmp_path / "r",
            "--max_train_steps", 1, *BASE]
    assert run_train(*args) == 0
    import mlx_sd.data as data_mod

    def fail(*a, **k):
        raise AssertionError("images re-encoded although the cache is valid")

    monkeypatch.setattr(data_mod, "encode_images", fail)
    assert run_train(*args, "--overwrite") == 0  # a new run in the same folder keeps the cache


def test_bad_entries_are_skipped_and_named(tiny_mlx_dir, tmp_path, capsys):
    data = make_dataset(tmp_path / "data", n=4)
    (data / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    rgba = Image.new("RGBA", (128, 128), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).ellipse([20, 40, 110, 100], fill=(30, 30, 200, 255))
    rgba.save(data / "images" / "rgba.png")
    caps = json.loads((data / "captions.json").read_text())
    caps.update({"corrupt.png": "a corrupt file", "missing.png": "a missing file", "rgba.png": "blue shoes",
                 "img00.png": caps["img00.png"]})
    caps["img01.png"] = "   "
    (data / "captions.json").write_text(json.dumps(caps))
    rc = run_train("--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", data,
                   "--output_dir", tmp_path / "run", "--max_train_steps", 2, *BASE)
    out = capsys.readouterr().out
    assert rc == 0
    assert "corrupt.png: unreadable image" in out and "missing.png: file not found" in out
    assert "img01.png: empty caption" in out and "rgba.png" not in out.split("dataset:")[0]
    assert "dataset: 4 images (3 skipped)" in out
    # RGBA is composited on white, not on black.
    from mlx_sd.data import preprocess
    x = preprocess(data / "images" / "rgba.png", 64)
    assert x.shape == (64, 64, 3) and x[0, 0].min() > 0.99

    rc = run_train("--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", data,
                   "--output_dir", tmp_path / "run2", "--max_train_steps", 1, "--strict_data", *BASE)
    assert rc == 2
    assert "3 problem(s)" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["list", "jsonl"])
def test_caption_layouts(tmp_path, layout):
    data = make_dataset(tmp_path / "d", n=3)
    caps = json.loads((data / "captions.json").read_text())
    (data / "captions.json").unlink()
    if layout == "list":
        recs = [{"image" if i % 2 else "file_name": f, "caption" if i % 2 else "text": c}
                for i, (f, c) in enumerate(caps.items())]
        (data / "captions.json").write_text(json.dumps(recs))
    else:
        lines = [json.dumps({"file_name": f, "text": c}) for f, c in caps.items()]
        (data / "images" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    images, recs = read_captions(data)
    assert dict(recs) == caps
    good, problems = scan(data)
    assert len(good) == 3 and not problems


def test_help_lists_every_flag():
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--pretrained_model_name_or_path", "--train_data_dir", "--output_dir", "--resolution",
                 "--train_batch_size", "--gradient_accumulation_steps", "--max_train_steps", "--num_train_epochs",
                 "--learning_rate", "--lr_scheduler", "--lr_warmup_steps", "--lora_rank", "--lora_alpha",
                 "--lora_dropout", "--gradient_checkpointing", "--seed", "--validation_steps", "--checkpointing_steps",
                 "--checkpoints_total_limit", "--resume_from_checkpoint", "--config", "--snr_gamma", "--noise_offset",
                 "--max_grad_norm", "--no_cache", "--report_to", "--check"):
        assert flag in out, flag
    assert "(default:" in out  # every flag's help line shows its default


def test_config_file_and_cli_override(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"learning_rate": 5e-5, "lora_rank": 16, "train_data_dir": "x"}))
    args = train.parse_args(["--config", str(cfg), "--lora_rank", "4"])
    assert args.learning_rate == 5e-5 and args.lora_rank == 4
    shipped = train.parse_args(["--config", str(ROOT / "configs" / "training_config.json"), "--train_data_dir", "x"])
    assert (shipped.train_batch_size, shipped.gradient_accumulation_steps, shipped.max_train_steps) == (2, 8, 3000)
    assert (shipped.lora_rank, shipped.lora_alpha, shipped.lr_scheduler, shipped.lr_warmup_steps) == (8, 16, "cosine",
                                                                                                      500)
    cfg.write_text(json.dumps({"learning_rte": 1}))
    with pytest.raises(SystemExit):
        train.parse_args(["--config", str(cfg), "--train_data_dir", "x"])


def test_bfloat16_base_trains_float32_adapter(tiny_mlx_dir, tmp_path):
    """A bfloat16 frozen base: same data and draws, loss close to float32, adapter stays float32."""
    data = make_dataset(tmp_path / "data", n=4)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        assert run_train("--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", data, "--output_dir", out,
                         "--max_train_steps", 4, "--base_dtype", dtype, *BASE) == 0
        logs = sorted((out / "logs").iterdir())[-1]
        losses[dtype] = [r["loss"] for r in map(json.loads, (logs / "metrics.jsonl").read_text().splitlines())]
        weights = mx.load(str(out / "lora_weights" / "adapter_model.safetensors"))
        assert all(v.dtype == mx.float32 for v in weights.values())
    f32, bf16 = np.array(losses["float32"]), np.array(losses["bfloat16"])
    print(f"first-step loss float32 {f32[0]:.5f} vs bfloat16 base {bf16[0]:.5f}")
    assert np.all(np.isfinite(bf16))
    assert abs(bf16[0] - f32[0]) / f32[0] < 0.05


def test_memory_budget_follows_checkpointing_and_is_restored(tiny_mlx_dir, tmp_path, capsys, monkeypatch, cpu_branches):
    from mlx_sd import memory

    data = make_dataset(tmp_path / "data", n=2)
    common = ["--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", data, "--check", *BASE]
    seen = []
    real = memory.set_budget
    monkeypatch.setattr(memory, "set_budget", lambda gb: seen.append(gb) or real(gb))
    before = mx.set_memory_limit(123_000_000_000)
    try:
        assert run_train(*common, "--output_dir", tmp_path / "a", "--gradient_checkpointing") == 0
        assert mx.set_memory_limit(123_000_000_000) == 123_000_000_000  # restored after the run
        weights = memory.weights_gb(ModelFolder(tiny_mlx_dir).unet())
        assert seen[-1] == pytest.approx(weights + memory.CHECKPOINTING_HEADROOM_GB, rel=0.01)
        assert f"memory budget for MLX's scheduler: {seen[-1]:.1f} GB" in capsys.readouterr().out
        assert run_train(*common, "--output_dir", tmp_path / "b") == 0
        assert seen[-1] is None and "memory budget for MLX's scheduler" not in capsys.readouterr().out
        assert run_train(*common, "--output_dir", tmp_path / "c", "--gradient_checkpointing",
                         "--memory_limit_gb", "0") == 0
        assert seen[-1] == 0 and "memory budget for MLX's scheduler" not in capsys.readouterr().out
        assert run_train(*common, "--output_dir", tmp_path / "d", "--memory_limit_gb", "2.5") == 0
        assert seen[-1] == 2.5 and "budget for MLX's scheduler: 2.5 GB" in capsys.readouterr().out
    finally:
        mx.set_memory_limit(before)
