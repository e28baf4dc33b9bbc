"""Every random draw of a training step is keyed per sample (mlx_sd.training, lora.layers).

A sample's noise, timestep, latent sample and LoRA dropout masks come from its own key, derived
from (seed, update, position in the update's global batch): gradient checkpointing, which runs
a block again in the backward pass, multiplies by the forward pass's masks; a sample draws the
same values in any batch; and the data plans put the same sample at the same position however
the global batch is split into ranks, per-device batches and accumulation steps.
"""

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from lora import LoRAConfig, inject_lora, lora_layers
from lora.layers import LoRALinear, dropout_keys
from mlx_sd.buckets import BucketPlan
from mlx_sd.captions import caption_key
from mlx_sd.data import BatchPlan, crop_key, flip_key, step_key
from mlx_sd.model_folder import ModelFolder
from mlx_sd.schedulers import NoiseSchedule
from mlx_sd.trainer import batch_positions
from mlx_sd.training import LossConfig, TrainStep, draw_noise, layer_keys, sample_keys, sample_latents

TOL = 1e-5  # relative L2: float32 sums taken in another order (another batch shape, recomputation)


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.array(v).ravel() for _, v in tree_flatten(tree)])


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


@pytest.fixture(scope="module")
def step_inputs(tiny_mlx_dir):
    folder = ModelFolder(tiny_mlx_dir)
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    std = np.full_like(mean, 0.1)
    ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
    return folder, NoiseSchedule(folder.scheduler_config()), mean, std, ctx, sample_keys(5, 0, [0, 1])


def _gradient(folder, schedule, batches, dropout: float, checkpointing: bool, noise_offset: float = 0.0):
    """The accumulated LoRA gradient over `batches` [(mean, std, ctx, keys)] with a compiled step."""
    mx.random.seed(0)  # LoRA init
    unet = folder.unet()
    inject_lora(unet, LoRAConfig(r=4, alpha=8, dropout=dropout))
    unet.gradient_checkpointing = checkpointing
    for layer in lora_layers(unet).values():  # non-zero B: every parameter gets a gradient
        layer.lora_B.weight = mx.random.normal(layer.lora_B.weight.shape) * 0.05
    step = TrainStep(unet, optim.SGD(learning_rate=0.1), schedule, LossConfig(noise_offset=noise_offset),
                     grad_accum=len(batches), max_grad_norm=0)
    mx.random.seed(123)  # the step must not depend on the global generator: move it away from the init's
    acc = step.zero_grads()
    for mean, std, ctx, keys in batches:
        _, acc = step.grad_step(mx.array(mean), mx.array(std), mx.array(ctx), mx.array(keys), acc)
    mx.eval(acc)
    return _flat(acc)


def test_gradient_checkpointing_keeps_the_dropout_masks(step_inputs):
    """Dropout 0.1: the same gradient with and without gradient checkpointing (it was 0.49 relative
    L2 apart when the recomputation drew new masks from the global generator)."""
    folder, schedule, mean, std, ctx, keys = step_inputs
    batch = [(mean, std, ctx, keys)]
    plain = _gradient(folder, schedule, batch, 0.1, False)
    ckpt = _gradient(folder, schedule, batch, 0.1, True)
    no_dropout = _gradient(folder, schedule, batch, 0.0, False)
    diff, effect = _rel(plain, ckpt), _rel(no_dropout, plain)
    print(f"dropout 0.1: gradient with vs without checkpointing {diff:.2e} (dropout itself moves it {effect:.2e})")
    assert diff <= TOL
    assert effect > 1e-2  # the masks are really applied


def test_a_sample_gets_the_same_gradient_in_any_batch(step_inputs):
    """One micro-batch of 2 vs 2 accumulated micro-batches of 1 (as 2 ranks would split it), every draw on
    (latent sample, noise, offset noise, timesteps, dropout masks, checkpointing): the same gradient."""
    folder, schedule, mean, std, ctx, keys = step_inputs
    whole = _gradient(folder, schedule, [(mean, std, ctx, keys)], 0.1, True, noise_offset=0.1)
    split = _gradient(folder, schedule, [(mean[i:i + 1], std[i:i + 1], ctx[i:i + 1], keys[i:i + 1]) for i in (0, 1)],
                      0.1, True, noise_offset=0.1) / 2  # accumulation sums; the step divides at the update
    other = _gradient(folder, schedule, [(mean, std, ctx, sample_keys(6, 0, [0, 1]))], 0.1, True, noise_offset=0.1)
    print(f"batch 2 vs 2 x batch 1: {_rel(whole, split):.2e}; another seed's keys: {_rel(whole, other):.2e}")
    assert _rel(whole, split) <= TOL
    assert _rel(whole, other) > 1e-2


def test_draws_of_a_sample_depend_only_on_its_key():
    keys = mx.array(sample_keys(3, 7, [0, 1, 2]))
    lat = mx.zeros((3, 8, 8, 4))
    schedule = type("S", (), {"num_train_timesteps": 1000})()
    noise, t = draw_noise(lat, schedule, 0.1, keys)
    alone, t_alone = draw_noise(lat[1:2], schedule, 0.1, keys[1:2])
    assert np.array_equal(np.array(noise[1:2]), np.array(alone)) and int(t[1]) == int(t_alone[0])
    assert len(set(np.array(t).tolist())) == 3 and not np.array_equal(np.array(noise[0]), np.array(noise[1]))
    eps = sample_latents(lat, lat + 1, 1.0, keys)
    assert np.array_equal(np.array(eps[2:]), np.array(sample_latents(lat[:1], lat[:1] + 1, 1.0, keys[2:])))
    assert not np.array_equal(np.array(eps[1]), np.array(noise[1]))  # each kind of draw has its own sub-key

    layer = LoRALinear(16, 8, r=4, dropout=0.5)
    layer.train()
    x = mx.ones((3, 5, 16))
    with dropout_keys(layer, layer_keys(keys, "unet_dropout", 1)):
        masks = np.array(layer._dropout(x))
    with dropout_keys(layer, layer_keys(keys[1:2], "unet_dropout", 1)):
        assert np.array_equal(np.array(layer._dropout(x[1:2])), masks[1:2])
    assert 0.3 < (masks == 0).mean() < 0.7 and set(np.unique(masks).tolist()) == {0.0, 2.0}
    assert not np.array_equal(masks[0], masks[1])
    assert layer.mask_keys is None  # the keys live only for the step


def test_lora_dropout_matches_peft_with_the_same_mask():
    """Our LoRA layer in training mode against PEFT's LoRA Linear whose `lora_dropout` applies our mask:
    output and gradients (x, A, B) agree to 1e-5 relative (float32)."""
    import torch
    from peft import LoraConfig as PeftConfig
    from peft import inject_adapter_in_model

    rng = np.random.default_rng(0)
    din, dout, r, alpha, p = 24, 16, 4, 8, 0.25
    base = rng.standard_normal((dout, din)).astype(np.float32) * 0.2
    bias = rng.standard_normal(dout).astype(np.float32)
    A = rng.standard_normal((r, din)).astype(np.float32) * 0.3
    B = rng.standard_normal((dout, r)).astype(np.float32) * 0.3
    x = rng.standard_normal((3, 5, din)).astype(np.float32)

    ours = LoRALinear(din, dout, r, alpha, p, bias=True)
    ours.base_layer.weight, ours.base_layer.bias = mx.array(base), mx.array(bias)
    ours.lora_A.weight, ours.lora_B.weight = mx.array(A), mx.array(B)
    ours.train()
    keys = layer_keys(mx.array(sample_keys(1, 0, [0, 1, 2])), "unet_dropout", 1)
    with dropout_keys(ours, keys):
        mask = np.array(ours._dropout(mx.ones(x.shape))) * (1 - p)  # the keep-mask our layer applies

        def f(layer, inp):
            return mx.sum(layer(inp) * mx.array(np.linspace(-1, 1, dout, dtype=np.float32)))
        y = np.array(ours(mx.array(x)))
        (gx, gm) = mx.grad(lambda inp, params: (ours.update(params), f(ours, inp))[1], argnums=(0, 1))(
            mx.array(x), ours.trainable_parameters())
    assert 0 < mask.mean() < 1 and set(np.unique(mask).tolist()) == {0.0, 1.0}

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(din, dout)

    class KeepMask(torch.nn.Module):  # PEFT's dropout with a given mask, nn.Dropout's scaling
        def forward(self, inp):
            return inp * torch.from_numpy(mask) / (1 - p)

    net = inject_adapter_in_model(PeftConfig(r=r, lora_alpha=alpha, lora_dropout=p, target_modules=["proj"]), Net())
    lora = net.proj
    with torch.no_grad():
        lora.base_layer.weight.copy_(torch.from_numpy(base))
        lora.base_layer.bias.copy_(torch.from_numpy(bias))
        lora.lora_A["default"].weight.copy_(torch.from_numpy(A))
        lora.lora_B["default"].weight.copy_(torch.from_numpy(B))
    lora.lora_dropout["default"] = KeepMask()
    net.train()
    xt = torch.from_numpy(x).requires_grad_()
    yt = lora(xt)
    (yt * torch.linspace(-1, 1, dout)).sum().backward()

    def rel(a, b):
        return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))

    errs = {"output": rel(y, yt.detach().numpy()), "dx": rel(gx, xt.grad.numpy()),
            "dA": rel(gm["lora_A"]["weight"], lora.lora_A["default"].weight.grad.numpy()),
            "dB": rel(gm["lora_B"]["weight"], lora.lora_B["default"].weight.grad.numpy())}
    print("vs PEFT with the same mask:", {k: f"{v:.1e}" for k, v in errs.items()})
    assert max(errs.values()) <= 1e-5
    # Without the mask (dropout off) the outputs differ: the comparison above depends on it.
    ours.eval()
    assert rel(np.array(ours(mx.array(x))), yt.detach().numpy()) > 1e-3


def _by_position(make_plan, splits, updates: int, check=lambda idx: True) -> list[dict]:
    """For each split (ranks, per-device batch, accumulation): {(update, position): (sample, flip)};
    `check(indices)` holds for every device's micro-batch."""
    out = []
    for ranks, b, k in splits:
        plan = make_plan(ranks * b, k, b)
        seen = {}
        for u in range(updates):
            for m in range(k):
                c = u * k + m
                _, idx, flips = plan(c)
                for r in range(ranks):
                    rows = slice(r * b, (r + 1) * b)
                    update, positions = batch_positions(plan, rows, c)
                    assert update == u
                    assert check(idx[rows]), (ranks, b, k, c, r)
                    for p, i, f in zip(positions, idx[rows], flips[rows]):
                        seen[(u, int(p))] = (int(i), bool(f))
        assert sorted(seen) == [(u, p) for u in range(updates) for p in range(ranks * b * k)]
        out.append(seen)
    return out


def test_batch_plan_puts_the_same_sample_at_each_position_for_any_split():
    """Global batch 8 from 7 images: 1 x 2 x 4, 2 ranks x 2 x 2, 1 x 8 x 1, 2 x 1 x 4, 4 x 2 x 1."""
    def make(batch, accum, _):
        return BatchPlan(7, batch, seed=3, flip=True, accum=accum)
    seen = _by_position(make, [(1, 2, 4), (2, 2, 2), (1, 8, 1), (2, 1, 4), (4, 2, 1)], updates=4)
    assert all(s == seen[0] for s in seen[1:])
    stream = [seen[0][(u, p)][0] for u in range(4) for p in range(8)]
    for e in range(4):  # every image once per epoch, the epochs one after the other
        assert sorted(stream[7 * e:7 * (e + 1)]) == list(range(7))
    flips = [f for _, f in seen[0].values()]
    assert 0 < sum(flips) < len(flips)


def test_bucket_plan_puts_the_same_sample_at_each_position_for_any_split():
    """Per-device batch 2, global batch 8: 1 x 4 accumulation, 2 ranks x 2, 4 ranks x 1; each
    device's batch is one bucket."""
    of = np.array([0] * 5 + [1] * 2 + [2] * 3 + [3])

    def make(batch, accum, group):
        return BucketPlan(of, batch, seed=5, flip=True, accum=accum, group=group)

    def one_bucket(idx):
        return len(set(of[idx].tolist())) == 1
    seen = _by_position(make, [(1, 2, 4), (2, 2, 2), (4, 2, 1)], updates=5, check=one_bucket)
    assert all(s == seen[0] for s in seen[1:])
    # Another per-device batch groups the buckets otherwise: a resume refuses it (bucket_batch).
    other = _by_position(make, [(1, 4, 2)], updates=5, check=one_bucket)
    assert other[0] != seen[0]


def test_step_keys_are_their_own_kind():
    r = range(6)
    step = {tuple(step_key(7, u, p)) for u in r for p in r}
    others = ({tuple(flip_key(7, e, j)) for e in r for j in r} | {tuple(crop_key(7, u, p)) for u in r for p in r}
              | {tuple(caption_key(7, u, p)) for u in r for p in r})
    assert not step & others
    keys = sample_keys(7, 2, range(64))
    assert keys.dtype == np.uint32 and keys.shape == (64, 2) and len({tuple(k) for k in keys}) == 64
    assert np.array_equal(sample_keys(7, 2, [5]), keys[5:6])
