"""Held-out validation loss: deterministic, independent of chunking and of resume, and a split that
never lets a held-out image into training."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from lora.layers import LoRAConfig, inject_lora, lora_layers
from mlx_sd.heldout import fixed_noise, fixed_timesteps, heldout_loss, item_losses, split_holdout
from mlx_sd.model_folder import ModelFolder
from mlx_sd.schedulers import NoiseSchedule


def test_split_is_by_name_not_order_and_disjoint():
    names = [f"shoe{i:04d}.png" for i in range(200)]
    train, held = split_holdout(names, 0.05, seed=3)
    assert len(held) == 10 and len(train) == 190 and not set(train) & set(held)
    assert sorted(train + held) == list(range(200))
    shuffled = names[::-1]
    _, held2 = split_holdout(shuffled, 0.05, seed=3)
    assert {names[i] for i in held} == {shuffled[i] for i in held2}
    assert {names[i] for i in split_holdout(names, 0.05, seed=4)[1]} != {names[i] for i in held}
    assert len(split_holdout(names[:3], 0.01)[1]) == 1  # at least one held out
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="validation_split"):
            split_holdout(names, bad)
    with pytest.raises(ValueError, match="none for training"):
        split_holdout(names[:1], 0.5)


def test_no_held_out_image_reaches_a_training_batch():
    from mlx_sd.data import epoch_order

    names = [f"img{i}.png" for i in range(57)]
    train, held = split_holdout(names, 0.1, seed=0)
    seen = set()
    for epoch in range(5):
        for j in epoch_order(len(train), seed=0, epoch=epoch):
            seen.add(names[train[j]])
    assert seen == {names[i] for i in train} and not seen & {names[i] for i in held}


def test_fixed_draws():
    assert fixed_timesteps(1000, 4).tolist() == [125, 375, 625, 875]
    a = fixed_noise(3, 1, (8, 8, 4), seed=0)
    assert np.array_equal(a, fixed_noise(3, 1, (8, 8, 4), seed=0))
    assert not np.array_equal(a, fixed_noise(3, 2, (8, 8, 4), seed=0))


@pytest.fixture(scope="module")
def tiny(tiny_mlx_dir):
    folder = ModelFolder(tiny_mlx_dir)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((3, 16, 16, 4)).astype(np.float32)
    ctx = rng.standard_normal((3, 77, 32)).astype(np.float32)
    return folder, NoiseSchedule(folder.scheduler_config()), latents, ctx


def _unet(folder, seed=0, dropout=0.0):
    mx.random.seed(seed)
    unet = folder.unet()
    inject_lora(unet, LoRAConfig(r=4, alpha=8, dropout=dropout))
    for layer in lora_layers(unet).values():
        layer.lora_B.weight = mx.random.normal(layer.lora_B.weight.shape) * 0.05
    return unet


def test_heldout_loss_is_deterministic_and_chunk_independent(tiny):
    folder, schedule, latents, ctx = tiny
    unet = _unet(folder, dropout=0.1)  # dropout must be off while scoring
    unet.train()
    a = heldout_loss(unet, schedule, latents, ctx, seed=0, per_image=2)
    mx.random.seed(123)  # MLX's random state does not enter
    b = heldout_loss(unet, schedule, latents, ctx, seed=0, per_image=2)
    assert a == b and np.isfinite(a) and unet.training
    c1 = heldout_loss(unet, schedule, latents, ctx, seed=0, per_image=2, chunk=1)
    c4 = heldout_loss(unet, schedule, latents, ctx, seed=0, per_image=2, chunk=4)
    print(f"held-out loss {a:.8f}; chunk 1 vs 4 relative difference {abs(c1 - c4) / c4:.1e}")
    assert c4 == a and abs(c1 - c4) <= 1e-6 * c4
    # the value is the plain mean of per-item losses at the fixed draws
    ts = fixed_timesteps(schedule.num_train_timesteps, 2)
    unet.eval()
    ref = np.mean([float(item_losses(unet, mx.array(latents[i:i + 1]), mx.array(ctx[i:i + 1]),
                                     mx.array(fixed_noise(i, k, latents.shape[1:], 0)[None]),
                                     mx.array([int(ts[k])]), schedule)[0])
                   for i in range(len(latents)) for k in range(len(ts))])
    assert abs(ref - a) <= 1e-6 * a


def test_heldout_loss_after_reload_of_the_adapter_is_identical(tiny, tmp_path):
    """A resume restores the adapter from its checkpoint: the loss on the restored weights is the same."""
    folder, schedule, latents, ctx = tiny
    unet = _unet(folder, seed=1)
    before = heldout_loss(unet, schedule, latents, ctx, per_image=2)
    from mlx.utils import tree_flatten

    mx.save_safetensors(str(tmp_path / "lora.safetensors"), dict(tree_flatten(unet.trainable_parameters())))
    fresh = _unet(folder, seed=99)
    assert heldout_loss(fresh, schedule, latents, ctx, per_image=2) != before
    fresh.load_weights(list(mx.load(str(tmp_path / "lora.safetensors")).items()), strict=False)
    assert heldout_loss(fresh, schedule, latents, ctx, per_image=2) == before


# --- wired into train.py -------------------------------------------------------------------------------


def _train(tiny_mlx_dir, data, out, *extra):
    import train

    args = [str(a) for a in ("--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", data,
                             "--output_dir", out, "--resolution", 128, "--lr_warmup_steps", 0, "--lr_scheduler",
                             "constant", "--no_validation", "--checkpointing_steps", 1, "--validation_steps", 1,
                             "--seed", 3, "--validation_split", 0.25, *extra)]
    assert train.main(args + ["--no_progress"]) == 0
    logs = sorted((out / "logs").iterdir())[-1]
    records = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in records if "val_loss" in r}


def test_train_validation_split_logs_val_loss_and_never_trains_on_held_out(tiny_mlx_dir, tmp_path, monkeypatch):
    import train
    from test_training import make_dataset

    data = make_dataset(tmp_path / "data", n=8)
    seen = []
    real = train.load_or_encode

    def spy(cache_dir, key, samples, *a, **k):
        seen.append({s.path.name for s in samples})
        return real(cache_dir, key, samples, *a, **k)

    monkeypatch.setattr(train, "load_or_encode", spy)
    val = _train(tiny_mlx_dir, data, tmp_path / "run", "--max_train_steps", 2, "--train_batch_size", 2,
                 "--learning_rate", 1e-3)
    training, held = seen  # the training set is encoded first, the held-out images once, apart
    assert len(training) == 6 and len(held) == 2 and not training & held
    assert sorted(val) == [1, 2] and all(np.isfinite(v) for v in val.values())


@pytest.mark.slow  # four tiny training runs
def test_train_val_loss_same_at_batch_1_and_4_and_after_resume(tiny_mlx_dir, tmp_path):
    from test_training import make_dataset

    data = make_dataset(tmp_path / "data", n=8)
    # learning rate 1e-30: the update is far below float32 resolution, so the weights stay the initial
    # ones and only the held-out computation itself could depend on the batch size
    b1 = _train(tiny_mlx_dir, data, tmp_path / "b1", "--max_train_steps", 1, "--train_batch_size", 1,
                "--learning_rate", 1e-30)
    b4 = _train(tiny_mlx_dir, data, tmp_path / "b4", "--max_train_steps", 1, "--train_batch_size", 4,
                "--learning_rate", 1e-30)
    assert b1 == b4
    full = _train(tiny_mlx_dir, data, tmp_path / "full", "--max_train_steps", 2, "--train_batch_size", 2,
                  "--learning_rate", 1e-3)
    import shutil

    shutil.copytree(tmp_path / "full" / "checkpoints" / "checkpoint-1", tmp_path / "ck1")
    resumed = _train(tiny_mlx_dir, data, tmp_path / "resumed", "--max_train_steps", 2, "--train_batch_size", 2,
                     "--learning_rate", 1e-3, "--resume_from_checkpoint", tmp_path / "ck1")
    print(f"val_loss uninterrupted {full}, resumed {resumed}")
    assert resumed[2] == full[2] and full[1] != full[2]
