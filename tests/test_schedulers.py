"""Noise schedule and samplers vs diffusers (float32).

Reference: the diffusers scheduler of the same name, `.from_config(dict)` on the same config dict.
Tolerances: timesteps exact; sigmas and init_noise_sigma 1e-6 relative (our betas come from
numpy's linspace, torch's differs in the last bit of some entries); a whole sampling loop with
the same deterministic fake model 1e-5 relative (max abs error / max abs value); add_noise,
get_velocity and SNR 1e-6 relative.

Euler ancestral draws noise inside `step`. We inject the same draws on both sides: ours through
`step(..., noise=)`, diffusers' by monkeypatching `randn_tensor` in the
`scheduling_euler_ancestral_discrete` module (the name its `step` calls), so every call returns the
next pre-drawn tensor. DDIM with eta > 0 uses diffusers' own `variance_noise=` argument.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.schedulers import scheduling_euler_ancestral_discrete

from fixtures import SD15, rel_err
from mlx_sd.config import ConfigError, SchedulerConfig
from mlx_sd.schedulers import (
    SAMPLERS,
    DDIMSampler,
    NoiseSchedule,
    compute_alphas_cumprod,
    make_sampler,
)

SD15_DICT = json.loads((SD15 / "scheduler" / "scheduler_config.json").read_text())

VARIANTS = {
    "sd15": {},  # leading spacing (absent key), steps_offset 1, epsilon
    "v_trailing": {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "set_alpha_to_one": True},
    "linspace": {"timestep_spacing": "linspace"},
    # clip_sample: only DDIM reads it (diffusers' other schedulers ignore it, and so do ours)
    "cosine_v": {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction", "clip_sample": True},
}

REFERENCE = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpm++2m": (DPMSolverMultistepScheduler, {}),
    "dpm++2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "pndm": (PNDMScheduler, {}),
}

SHAPE = (2, 8, 8, 4)  # NHWC latents


def config_dict(variant: str) -> dict:
    return {**SD15_DICT, **VARIANTS[variant]}


def reference(name: str, d: dict):
    cls, kw = REFERENCE[name]
    # A diffusers pipeline swaps schedulers with `.from_config(pipe.scheduler.config)`, a PNDM config
    # that always carries timestep_spacing ("leading" when the file lacks it). Raw `from_config` on
    # the file would use each class's own default instead ("linspace" for Euler/DPM). We compare
    # against the pipeline behaviour; test_sd15_spacing_default_is_leading pins that fact.
    d = {"timestep_spacing": PNDMScheduler.from_config(d).config.timestep_spacing, **d}
    return cls.from_config(d, **kw)


def fake_model(x: np.ndarray, t: float) -> np.ndarray:
    """A deterministic, elementwise stand-in for the UNet (same values in NHWC or NCHW)."""
    x = x.astype(np.float32)
    return (0.6 * np.tanh(x) + 0.3 * np.cos(2.0 * x + np.float32(t / 150.0))).astype(np.float32)


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.numpy().transpose(0, 2, 3, 1)




def run_ours(sampler, x_T, noises=None):
    x = mx.array(x_T) * sampler.init_noise_sigma
    for i, t in enumerate(sampler.timesteps):
        inp = sampler.scale_model_input(x, t)
        out = mx.array(fake_model(np.array(inp), float(t)))
        noise = None if noises is None else mx.array(noises[i])
        x = sampler.step(out, t, x, noise=noise)
    return np.array(x)


def run_diffusers(ref, x_T, monkeypatch=None, noises=None):
    if noises is not None:  # feed diffusers' Euler-ancestral step our pre-drawn noise, in order
        queue = [nchw(n) for n in noises]
        monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor", lambda *a, **k: queue.pop(0))
    if hasattr(ref, "set_begin_index"):
        # diffusers finds its first step index by timestep *value* and takes the second match when
        # one repeats (Karras sigmas on the cosine schedule give 998 four times), then runs past the
        # end. Pinning the start to 0 is equivalent whenever timesteps are distinct; ours counts steps.
        ref.set_begin_index(0)
    x = nchw(x_T) * ref.init_noise_sigma
    for t in ref.timesteps:
        inp = ref.scale_model_input(x, t)
        out = torch.from_numpy(fake_model(inp.numpy(), float(t)))
        x = ref.step(out, t, x).prev_sample
    if noises is not None:
        assert not queue, "diffusers drew a different number of noise tensors"
    return nhwc(x)


def test_sd15_spacing_default_is_leading():
    assert "timestep_spacing" not in SD15_DICT
    assert PNDMScheduler.from_config(SD15_DICT).config.timestep_spacing == "leading"
    assert SchedulerConfig.from_diffusers(SD15_DICT).timestep_spacing == "leading"


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_matches_diffusers(name, variant, steps, monkeypatch):
    d = config_dict(variant)
    ours = make_sampler(name, SchedulerConfig.from_diffusers(d))
    ref = reference(name, d)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)

    np.testing.assert_array_equal(np.array(ours.timesteps), ref.timesteps.numpy())
    if hasattr(ours, "sigmas"):
        np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-6, atol=0)
    np.testing.assert_allclose(ours.init_noise_sigma, float(ref.init_noise_sigma), rtol=1e-6)

    rng = np.random.default_rng(0)
    x_T = rng.standard_normal(SHAPE).astype(np.float32)
    noises = None
    if ours.stochastic:
        noises = rng.standard_normal((len(ours.timesteps), *SHAPE)).astype(np.float32)
    got = run_ours(ours, x_T, noises)
    want = run_diffusers(ref, x_T, monkeypatch, noises)
    assert np.isfinite(got).all()
    assert rel_err(got, want) <= 1e-5, rel_err(got, want)


@pytest.mark.parametrize("variant", ["sd15", "v_trailing"])
def test_euler_ancestral_single_step_with_injected_noise(variant, monkeypatch):
    d = config_dict(variant)
    ours, ref = make_sampler("euler_a", d), reference("euler_a", d)
    ours.set_timesteps(25)
    ref.set_timesteps(25)
    rng = np.random.default_rng(1)
    x, noise = rng.standard_normal((2, *SHAPE)).astype(np.float32)
    out = fake_model(x, ours.timesteps[0])
    monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor", lambda *a, **k: nchw(noise))
    want = nhwc(ref.step(torch.from_numpy(out.transpose(0, 3, 1, 2).copy()), ref.timesteps[0], nchw(x)).prev_sample)
    got = np.array(ours.step(mx.array(out), ours.timesteps[0], mx.array(x), noise=mx.array(noise)))
    assert rel_err(got, want) <= 1e-6


def test_euler_ancestral_key_is_reproducible():
    s = make_sampler("euler_a", SD15_DICT)
    x = mx.ones(SHAPE)
    results = []
    for _ in range(2):
        s.set_timesteps(10)
        t = s.timesteps[0]
        results.append(s.step(x * 0.1, t, x, key=mx.random.key(7)))
    assert mx.array_equal(results[0], results[1])


@pytest.mark.parametrize("variant", ["sd15", "v_trailing"])
def test_ddim_eta_matches_diffusers_variance_noise(variant):
    d = config_dict(variant)
    ours, ref = DDIMSampler(d, eta=1.0), reference("ddim", d)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    rng = np.random.default_rng(2)
    x_T = rng.standard_normal(SHAPE).astype(np.float32)
    noises = rng.standard_normal((10, *SHAPE)).astype(np.float32)
    got = run_ours(ours, x_T, noises)
    x = nchw(x_T)
    for t, n in zip(ref.timesteps, noises):
        out = torch.from_numpy(fake_model(x.numpy(), float(t)))
        x = ref.step(out, t, x, eta=1.0, variance_noise=nchw(n)).prev_sample
    assert rel_err(got, nhwc(x)) <= 1e-5


SCHEDULE_VARIANTS = {
    "sd15": {},
    "linear": {"beta_schedule": "linear"},
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},
    "trained": {"trained_betas": np.linspace(1e-4, 2e-2, 1000).tolist()},
}


@pytest.mark.parametrize("variant", list(SCHEDULE_VARIANTS))
def test_noise_schedule_matches_ddpm(variant):
    d = {**SD15_DICT, **SCHEDULE_VARIANTS[variant]}
    ref = DDPMScheduler.from_config(d)
    ns = NoiseSchedule(SchedulerConfig.from_diffusers(d))
    np.testing.assert_allclose(np.array(ns.betas), ref.betas.numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.array(ns.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=1e-6)

    rng = np.random.default_rng(3)
    x0, noise = rng.standard_normal((2, 5, 8, 8, 4)).astype(np.float32)
    t = np.array([0, 1, 250, 500, 999])
    args = (nchw(x0), nchw(noise), torch.from_numpy(t))
    margs = (mx.array(x0), mx.array(noise), mx.array(t))
    assert rel_err(ns.add_noise(*margs), nhwc(ref.add_noise(*args))) <= 1e-6
    assert rel_err(ns.velocity(*margs), nhwc(ref.get_velocity(*args))) <= 1e-6
    ac = ref.alphas_cumprod.numpy()[t]
    np.testing.assert_allclose(np.array(ns.snr(mx.array(t))), ac / (1 - ac), rtol=1e-6)


def test_noise_schedule_targets_and_compile():
    rng = np.random.default_rng(4)
    x0, noise = (mx.array(a) for a in rng.standard_normal((2, 3, 4, 4, 4)).astype(np.float32))
    t = mx.array([3, 400, 998])
    eps = NoiseSchedule(SD15_DICT)
    vpred = NoiseSchedule({**SD15_DICT, "prediction_type": "v_prediction"})
    assert mx.array_equal(eps.target(x0, noise, t), noise)
    assert mx.array_equal(vpred.target(x0, noise, t), vpred.velocity(x0, noise, t))

    def loss_parts(x0, noise, t):
        return vpred.add_noise(x0, noise, t), vpred.target(x0, noise, t), vpred.snr(t)

    for a, b in zip(mx.compile(loss_parts)(x0, noise, t), loss_parts(x0, noise, t)):
        assert mx.allclose(a, b, rtol=1e-6, atol=1e-7)
    ts = eps.sample_timesteps(64, key=mx.random.key(0))
    assert ts.shape == (64,) and 0 <= ts.min().item() and ts.max().item() < 1000


def test_unsupported_beta_schedule_is_a_clear_error():
    with pytest.raises(ConfigError, match="beta_schedule='sigmoid' is not supported"):
        SchedulerConfig.from_diffusers({**SD15_DICT, "beta_schedule": "sigmoid"})
    cfg = SchedulerConfig(beta_schedule="sigmoid")  # a dataclass built directly skips from_diffusers
    with pytest.raises(ConfigError, match="beta_schedule='sigmoid' is not supported; use one of"):
        NoiseSchedule(cfg)
    with pytest.raises(ConfigError, match="beta_schedule='sigmoid'"):
        make_sampler("euler", cfg)
    with pytest.raises(ConfigError, match="timestep_spacing='uniform'"):
        compute_alphas_cumprod(SchedulerConfig(timestep_spacing="uniform"))


def test_sampler_misuse_errors():
    with pytest.raises(ValueError, match="unknown sampler 'heun'; choose one of ddim, euler"):
        make_sampler("heun", SD15_DICT)
    s = make_sampler("pndm", SD15_DICT)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(mx.zeros(SHAPE), 1, mx.zeros(SHAPE))
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="expected 901"):
        s.step(mx.zeros(SHAPE), 801, mx.zeros(SHAPE))
    with pytest.raises(ValueError, match="num_inference_steps=0"):
        s.set_timesteps(0)
