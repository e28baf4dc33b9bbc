"""One training step against diffusers' `examples/text_to_image/train_text_to_image_lora.py`.

The reference side repeats that script's step with torch on the same tiny UNet: `DDPMScheduler` from
the model's scheduler config, `noise += noise_offset * torch.randn((bsz, C, 1, 1))`,
`noise_scheduler.add_noise`, epsilon target, plain `F.mse_loss` without `--snr_gamma`, else
`compute_snr` (diffusers.training_utils) and min(snr, gamma) / snr weights on the per-sample MSE.
The LoRA is PEFT's, added with `unet.add_adapter(LoraConfig(...))` as the script does. Our side is
the product's compiled `TrainStep.grad_step` (`loss_fn`) with the noise composed by `offset_noise`,
fed the same latents, base noise, offset noise, timesteps, text embeddings and LoRA weights.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from fixtures import rel_err
from lora import LoRAConfig, inject_lora, lora_layers
from mlx_sd.model_folder import ModelFolder
from mlx_sd.schedulers import NoiseSchedule
from mlx_sd.training import LossConfig, TrainStep, make_optimizer, offset_noise, sample_keys

TOL = 1e-4
R, ALPHA = 4, 8
SETTINGS = {"default": LossConfig(), "--snr_gamma 5": LossConfig(snr_gamma=5.0),
            "--noise_offset 0.1": LossConfig(noise_offset=0.1)}
# Small timesteps have SNR above 5 (weight min(snr, 5) / snr < 1), large ones below (weight 1).
TIMESTEPS = np.array([3, 120, 640], dtype=np.int64)
TABLE: list[tuple[str, float, float, float, str]] = []


def _inputs(seed=0, batch=3, size=16, channels=4, dim=32):
    rng = np.random.default_rng(seed)
    f32 = np.float32
    return dict(latents=rng.standard_normal((batch, size, size, channels)).astype(f32),
                noise=rng.standard_normal((batch, size, size, channels)).astype(f32),
                offset=rng.standard_normal((batch, 1, 1, channels)).astype(f32),
                ctx=rng.standard_normal((batch, 77, dim)).astype(f32), t=TIMESTEPS[:batch])


def _nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def _ours(folder: ModelFolder, loss: LossConfig, x: dict, seed: int = 1):
    """Loss and LoRA gradients of the product's step; also the A/B weights it used."""
    unet = folder.unet()
    inject_lora(unet, LoRAConfig(r=R, alpha=ALPHA))
    key = mx.random.key(seed)
    for _, layer in sorted(lora_layers(unet).items()):  # non-zero B, so A gets a gradient too
        k1, k2, key = mx.random.split(key, 3)
        layer.lora_A.weight = mx.random.normal(layer.lora_A.weight.shape, key=k1) * (1 / R)
        layer.lora_B.weight = mx.random.normal(layer.lora_B.weight.shape, key=k2) * 0.05
    mx.eval(unet.parameters())
    weights = {k: np.array(v) for k, v in tree_flatten(unet.trainable_parameters())}
    noise = offset_noise(mx.array(x["noise"]), mx.array(x["offset"]), loss.noise_offset)
    t = mx.array(x["t"].astype(np.int32))
    step = TrainStep(unet, make_optimizer(1e-4, "constant", 0, 1), NoiseSchedule(folder.scheduler_config()), loss,
                     draw=lambda latents, keys: (noise, t), sample=lambda mean, std, keys: mean)
    latents = mx.array(x["latents"])
    keys = mx.array(sample_keys(seed, 0, range(latents.shape[0])))  # unused: the draws above replace the step's
    value, grads = step.grad_step(latents, mx.zeros_like(latents), mx.array(x["ctx"]), keys, step.zero_grads())
    mx.eval(value, grads)
    return float(value), {k: np.array(v) for k, v in tree_flatten(grads)}, weights


def _reference(diffusers_dir, loss: LossConfig, x: dict, weights: dict):
    """train_text_to_image_lora.py's step arithmetic, with its noise draws replaced by the given tensors."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import compute_snr
    from peft import LoraConfig

    noise_scheduler = DDPMScheduler.from_pretrained(str(diffusers_dir), subfolder="scheduler")
    unet = UNet2DConditionModel.from_pretrained(str(diffusers_dir), subfolder="unet")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=R, lora_alpha=ALPHA, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = dict(unet.named_parameters())
    lora = {}
    with torch.no_grad():
        for k, v in weights.items():  # ours: ...to_q.lora_A.weight; PEFT: ...to_q.lora_A.default.weight
            name = k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
            params[name].copy_(torch.from_numpy(v))
            lora[k] = params[name]
    assert sorted(n for n, p in params.items() if p.requires_grad) == sorted(p for p in params if "lora" in p)
    assert len(lora) == len([p for p in params if "lora" in p])  # every PEFT LoRA weight was set

    latents, timesteps = _nchw(x["latents"]), torch.from_numpy(x["t"]).long()
    noise = _nchw(x["noise"])
    if loss.noise_offset:
        noise += loss.noise_offset * _nchw(x["offset"])  # the script's torch.randn((bsz, C, 1, 1))
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    assert noise_scheduler.config.prediction_type == "epsilon"
    target = noise
    model_pred = unet(noisy_latents, timesteps, torch.from_numpy(x["ctx"])).sample
    if not loss.snr_gamma:
        value = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    else:
        snr = compute_snr(noise_scheduler, timesteps)
        mse_loss_weights = torch.stack([snr, loss.snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0] / snr
        value = F.mse_loss(model_pred.float(), target.float(), reduction="none")
        value = value.mean(dim=list(range(1, len(value.shape)))) * mse_loss_weights
        value = value.mean()
    value.backward()
    return float(value.detach()), {k: p.grad.numpy() for k, p in lora.items()}, \
        mse_loss_weights if loss.snr_gamma else None


@pytest.fixture(scope="module", autouse=True)
def parity_table():
    """The figures of every setting, printed once at the end (visible with -s)."""
    yield
    if TABLE:
        print(f"\n{'setting':<20} {'loss':>10} {'loss rel err':>13} {'max grad rel err':>17}  worst gradient")
        for row in TABLE:
            print(f"{row[0]:<20} {row[1]:>10.6f} {row[2]:>13.2e} {row[3]:>17.2e}  {row[4]}")


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_step_matches_diffusers_lora_script(setting, tiny_mlx_dir, tiny_diffusers_dir):
    loss = SETTINGS[setting]
    x = _inputs()
    value, grads, weights = _ours(ModelFolder(tiny_mlx_dir), loss, x)
    want, want_grads, w = _reference(tiny_diffusers_dir, loss, x, weights)
    if w is not None:  # the weighting really acts: one sample damped, one not
        assert float(w.min()) < 0.5 and float(w.max()) == 1.0
    assert set(grads) == set(want_grads) and len(grads) == 2 * len([k for k in grads if ".lora_A." in k]) > 0
    loss_err = abs(value - want) / abs(want)
    grad_errs = {k: rel_err(grads[k], want_grads[k]) for k in grads}
    worst = max(grad_errs, key=grad_errs.get)
    TABLE.append((setting, value, loss_err, grad_errs[worst], worst))
    assert all(np.abs(g).max() > 0 for k, g in want_grads.items() if ".lora_A." in k)  # B != 0 reaches A
    assert loss_err <= TOL
    assert grad_errs[worst] <= TOL, f"{worst}: {grad_errs[worst]:.2e}"


def test_settings_change_the_step(tiny_mlx_dir):
    """The three settings give three different losses on the same inputs (each flag reaches the step)."""
    x = _inputs()
    folder = ModelFolder(tiny_mlx_dir)
    values = [_ours(folder, loss, x)[0] for loss in SETTINGS.values()]
    assert min(abs(a - b) for i, a in enumerate(values) for b in values[i + 1:]) > 1e-4 * max(values)
