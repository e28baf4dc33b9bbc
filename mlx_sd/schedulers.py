"""Noise schedule (training) and samplers (inference), numerically matching diffusers.

Layouts and units:
- Latents are NHWC float32 mx arrays `[B, H, W, C]`; every operation here is elementwise, so any
  shape with the batch first works (per-sample coefficients broadcast over the other axes).
- Training timesteps are integer indices in `[0, num_train_timesteps)`, an int array `[B]`.
- Sampler `timesteps` are Python numbers in the same unit (Euler's may be fractional), to pass to
  the UNet as they are. `sigmas` (Euler, DPM-Solver) are the k-diffusion noise levels
  `sqrt((1 - alphas_cumprod) / alphas_cumprod)`, float32, with a final 0 appended.

Each sampler mirrors one diffusers scheduler built with `.from_config(the same dict)`:
DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
DPMSolverMultistepScheduler (dpmsolver++, order 2) and PNDMScheduler (PLMS, skip_prk_steps).
The per-step coefficients are computed in numpy float32 in the same order as diffusers computes
them on 0-d torch tensors, so a whole sampling loop agrees to ~1e-6 relative.

diffusers' schedulers each have a different *class default* for `timestep_spacing`, used when the
dict lacks the key (e.g. Euler and DPM-Solver default to "linspace"). A diffusers pipeline never
hits that: its scheduler config comes from the loaded PNDMScheduler, which fills in "leading".
`SchedulerConfig` does the same ("leading" when absent), so we match the pipeline behaviour.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from .config import ConfigError, SchedulerConfig

_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_PREDICTION_TYPES = ("epsilon", "v_prediction")
_SPACINGS = ("leading", "trailing", "linspace")


def _validate(cfg: SchedulerConfig) -> None:
    # SchedulerConfig.from_diffusers checks these too, but the dataclass can be built directly.
    if cfg.trained_betas is None and cfg.beta_schedule not in _BETA_SCHEDULES:
        raise ConfigError(f"scheduler config: beta_schedule={cfg.beta_schedule!r} is not supported; "
                          f"use one of {', '.join(_BETA_SCHEDULES)} or give trained_betas")
    if cfg.prediction_type not in _PREDICTION_TYPES:
        raise ConfigError(f"scheduler config: prediction_type={cfg.prediction_type!r} is not supported; "
                          f"use one of {', '.join(_PREDICTION_TYPES)}")
    if cfg.timestep_spacing not in _SPACINGS:
        raise ConfigError(f"scheduler config: timestep_spacing={cfg.timestep_spacing!r} is not supported; "
                          f"use one of {', '.join(_SPACINGS)}")


def _as_config(config: SchedulerConfig | dict) -> SchedulerConfig:
    cfg = config if isinstance(config, SchedulerConfig) else SchedulerConfig.from_diffusers(config)
    _validate(cfg)
    return cfg


def compute_betas(cfg: SchedulerConfig) -> np.ndarray:
    """Betas as diffusers builds them: float32, `scaled_linear` = linspace of the square roots, squared."""
    _validate(cfg)
    T = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        return np.asarray(cfg.trained_betas, dtype=np.float32)
    if cfg.beta_schedule == "linear":
        return np.linspace(cfg.beta_start, cfg.beta_end, T).astype(np.float32)
    if cfg.beta_schedule == "scaled_linear":
        # torch.linspace rounds differently from numpy in the last bit of ~30% of entries; the
        # resulting alphas_cumprod differ by <= 4e-7 relative (tested), well below float32 noise.
        return np.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, T).astype(np.float32) ** 2
    # squaredcos_cap_v2: diffusers' betas_for_alpha_bar (cosine schedule, Nichol & Dhariwal 2021).
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)], np.float32)


def compute_alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    alphas = np.float32(1.0) - compute_betas(cfg)
    # torch's CPU cumprod accumulates float32 inputs in float64; so do we.
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


class NoiseSchedule:
    """The forward (noising) process for training: DDPM `add_noise`, v targets and SNR.

    Pure mx functions of their array arguments (the config is read at construction), so they can
    be called inside `mx.compile`d train steps.
    """

    def __init__(self, config: SchedulerConfig | dict):
        self.config = _as_config(config)
        self.num_train_timesteps = self.config.num_train_timesteps
        self.prediction_type = self.config.prediction_type
        self.betas = mx.array(compute_betas(self.config))
        self.alphas_cumprod = mx.array(compute_alphas_cumprod(self.config))
        self.sqrt_alphas_cumprod = mx.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = mx.sqrt(1.0 - self.alphas_cumprod)

    @staticmethod
    def _per_sample(table: mx.array, timesteps: mx.array, like: mx.array) -> mx.array:
        c = table[timesteps].astype(like.dtype)
        return c.reshape((-1,) + (1,) * (like.ndim - 1))

    def add_noise(self, x0: mx.array, noise: mx.array, timesteps: mx.array) -> mx.array:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        a = self._per_sample(self.sqrt_alphas_cumprod, timesteps, x0)
        s = self._per_sample(self.sqrt_one_minus_alphas_cumprod, timesteps, x0)
        return a * x0 + s * noise

    def velocity(self, x0: mx.array, noise: mx.array, timesteps: mx.array) -> mx.array:
        """v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0 (diffusers' get_velocity)."""
        a = self._per_sample(self.sqrt_alphas_cumprod, timesteps, x0)
        s = self._per_sample(self.sqrt_one_minus_alphas_cumprod, timesteps, x0)
        return a * noise - s * x0

    def target(self, x0: mx.array, noise: mx.array, timesteps: mx.array) -> mx.array:
        """What the UNet should predict under this config's prediction_type."""
        if self.prediction_type == "v_prediction":
            return self.velocity(x0, noise, timesteps)
        return noise

    def snr(self, timesteps: mx.array) -> mx.array:
        """Signal-to-noise ratio abar_t / (1 - abar_t), float32 [B] (for min-SNR loss weighting)."""
        a = self.alphas_cumprod[timesteps]
        return a / (1.0 - a)

    def sample_timesteps(self, batch_size: int, key: mx.array | None = None) -> mx.array:
        """Uniform integer timesteps in [0, num_train_timesteps), int32 [B]."""
        return mx.random.randint(0, self.num_train_timesteps, (batch_size,), key=key)


# ---------------------------------------------------------------------------------------------
# Samplers


def _spaced(spacing: str, n: int, T: int, offset: int) -> np.ndarray:
    """Descending float64 timesteps for `n` steps, diffusers' common spacing rules (not rounded).

    Only "leading" applies `steps_offset` (that is what diffusers does)."""
    if spacing == "linspace":
        return np.linspace(0, T - 1, n)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).astype(np.float64)[::-1] + offset
    return np.round(np.arange(T, 0, -T / n)) - 1  # trailing


def _f(x) -> float:
    """A float32 coefficient as a Python float (exact), so mx keeps the array's float32 dtype."""
    return float(np.float32(x))


def _sqrt(x) -> np.float32:
    return np.sqrt(np.float32(x))


class Sampler:
    """Common interface. Call `set_timesteps(n)`, start from noise * `init_noise_sigma`, then for
    each `t` in `timesteps`: `x_in = scale_model_input(x, t)`, run the UNet, `x = step(out, t, x)`.

    Samplers keep state (a step counter, past model outputs): call `step` once per entry of
    `timesteps`, in order; `set_timesteps` resets them. `t` is checked against the schedule.
    """

    stochastic = False  # True where `step` draws noise (pass `key=` or `noise=` for reproducibility)

    def __init__(self, config: SchedulerConfig | dict):
        self.config = _as_config(config)
        self.num_train_timesteps = self.config.num_train_timesteps
        self.alphas_cumprod = compute_alphas_cumprod(self.config)  # numpy float32 [T]
        self.timesteps: list = []
        self.init_noise_sigma = 1.0
        self._i = 0

    def set_timesteps(self, num_inference_steps: int) -> None:
        if not 1 <= num_inference_steps <= self.num_train_timesteps:
            raise ValueError(f"num_inference_steps={num_inference_steps} must be in [1, {self.num_train_timesteps}]")
        self.num_inference_steps = num_inference_steps
        self._i = 0
        self._set_timesteps(num_inference_steps)

    def _set_timesteps(self, n: int) -> None:
        raise NotImplementedError

    def _index(self, t) -> int:
        if not self.timesteps:
            raise ValueError(f"{type(self).__name__}: call set_timesteps() before sampling")
        if self._i >= len(self.timesteps):
            raise ValueError(f"{type(self).__name__}: step() called more often than the "
                             f"{len(self.timesteps)} timesteps; call set_timesteps() to start again")
        if t is not None and float(t) != float(self.timesteps[self._i]):
            raise ValueError(f"{type(self).__name__}: got timestep {float(t)}, expected "
                             f"{self.timesteps[self._i]} (step {self._i}); pass the entries of .timesteps in order")
        return self._i

    def scale_model_input(self, sample: mx.array, t) -> mx.array:
        return sample

    def step(self, model_output: mx.array, t, sample: mx.array, key: mx.array | None = None,
             noise: mx.array | None = None) -> mx.array:
        raise NotImplementedError

    @staticmethod
    def _noise(sample: mx.array, key, noise) -> mx.array:
        # Explicit `noise` exists so tests (and reproducible pipelines) can inject the draw.
        return noise if noise is not None else mx.random.normal(sample.shape, key=key)


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2020); eta=0 is deterministic, eta=1 is DDPM-like."""

    def __init__(self, config: SchedulerConfig | dict, eta: float = 0.0):
        super().__init__(config)
        self.eta = float(eta)
        self.stochastic = self.eta > 0
        self.final_alpha_cumprod = np.float32(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def _set_timesteps(self, n):
        c = self.config
        ts = _spaced(c.timestep_spacing, n, self.num_train_timesteps, c.steps_offset)
        self.timesteps = ts.round().astype(np.int64).tolist()

    def step(self, model_output, t, sample, key=None, noise=None):
        i = self._index(t)
        self._i += 1
        t = self.timesteps[i]
        # diffusers steps back by T // n whatever the spacing (so trailing/linspace land off-grid).
        prev = t - self.num_train_timesteps // self.num_inference_steps
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        b_t = 1 - a_t
        if self.config.prediction_type == "epsilon":
            x0 = (sample - _f(_sqrt(b_t)) * model_output) / _f(_sqrt(a_t))
            eps = model_output
        else:  # v_prediction
            x0 = _f(_sqrt(a_t)) * sample - _f(_sqrt(b_t)) * model_output
            eps = _f(_sqrt(a_t)) * model_output + _f(_sqrt(b_t)) * sample
        if self.config.clip_sample:
            x0 = mx.clip(x0, -1.0, 1.0)
        variance = ((1 - a_prev) / b_t) * (1 - a_t / a_prev)
        std = np.float32(self.eta) * _sqrt(variance)
        prev_sample = _f(_sqrt(a_prev)) * x0 + _f(_sqrt(1 - a_prev - std**2)) * eps
        if self.eta > 0:
            prev_sample = prev_sample + _f(std) * self._noise(sample, key, noise)
        return prev_sample


class _SigmaSampler(Sampler):
    """Shared by the k-diffusion style samplers (Euler, Euler ancestral): x = x0 + sigma * eps."""

    def _set_timesteps(self, n):
        c = self.config
        # Float32 timesteps: with "linspace" they are fractional and the sigmas are interpolated.
        ts = _spaced(c.timestep_spacing, n, self.num_train_timesteps, c.steps_offset).astype(np.float32)
        train_sigmas = np.sqrt((1 - self.alphas_cumprod) / self.alphas_cumprod)
        sigmas = np.interp(ts, np.arange(len(train_sigmas)), train_sigmas)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.timesteps = [float(t) for t in ts]
        s = self.sigmas.max()
        # "leading" never reaches the last train step, so diffusers starts from the variance-preserving
        # scale sqrt(sigma^2 + 1) there; the others start at sigma_max. We copy that choice.
        self.init_noise_sigma = float(s if c.timestep_spacing in ("linspace", "trailing") else _sqrt(s * s + 1))

    def scale_model_input(self, sample, t):
        sigma = self.sigmas[self._index(t)]
        return sample / _f(_sqrt(sigma * sigma + 1))

    def _x0(self, model_output, sample, sigma):
        if self.config.prediction_type == "epsilon":
            return sample - _f(sigma) * model_output
        return model_output * _f(-sigma / _sqrt(sigma * sigma + 1)) + sample / _f(sigma * sigma + 1)


class EulerSampler(_SigmaSampler):
    """Euler (Karras et al. 2022, Algorithm 2 with s_churn=0), deterministic."""

    def step(self, model_output, t, sample, key=None, noise=None):
        i = self._index(t)
        self._i += 1
        sigma = self.sigmas[i]
        x0 = self._x0(model_output, sample, sigma)
        derivative = (sample - x0) / _f(sigma)
        return sample + derivative * _f(self.sigmas[i + 1] - sigma)


class EulerAncestralSampler(_SigmaSampler):
    """Euler ancestral: an Euler step down to sigma_down, then fresh noise of scale sigma_up."""

    stochastic = True

    def step(self, model_output, t, sample, key=None, noise=None):
        i = self._index(t)
        self._i += 1
        s_from, s_to = self.sigmas[i], self.sigmas[i + 1]
        x0 = self._x0(model_output, sample, s_from)
        sigma_up = _sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2)
        sigma_down = _sqrt(s_to**2 - sigma_up**2)
        derivative = (sample - x0) / _f(s_from)
        prev_sample = sample + derivative * _f(sigma_down - s_from)
        return prev_sample + self._noise(sample, key, noise) * _f(sigma_up)


class DPMSolverMultistepSampler(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022): data-prediction, second-order multistep, midpoint form.

    The first step and the last (down to sigma=0) are first order, as in diffusers'
    DPMSolverMultistepScheduler defaults (lower_order_final, final_sigmas_type "zero").
    `use_karras_sigmas` spaces the noise levels as Karras et al. (rho=7) and rounds the matching
    timesteps (except for squaredcos_cap_v2, where diffusers truncates them).
    """

    def __init__(self, config: SchedulerConfig | dict, use_karras_sigmas: bool = False):
        super().__init__(config)
        self.use_karras_sigmas = bool(use_karras_sigmas)

    def _set_timesteps(self, n):
        c, T = self.config, self.num_train_timesteps
        # DPM-Solver's own rule: n + 1 points, the final one (t=0) dropped; trailing as elsewhere.
        if c.timestep_spacing == "trailing":
            ts = _spaced("trailing", n, T, c.steps_offset)
        else:
            ts = _spaced(c.timestep_spacing, n + 1, T, c.steps_offset)[:-1]
        ts = ts.round()
        train_sigmas = np.sqrt((1 - self.alphas_cumprod) / self.alphas_cumprod)
        log_sigmas = np.log(train_sigmas)
        if self.use_karras_sigmas:
            rho = 7.0
            lo, hi = float(train_sigmas[0]) ** (1 / rho), float(train_sigmas[-1]) ** (1 / rho)
            sigmas = (hi + np.linspace(0, 1, n) * (lo - hi)) ** rho
            ts = _sigma_to_t(sigmas, log_sigmas)
            if c.beta_schedule != "squaredcos_cap_v2":
                ts = ts.round()
        else:
            sigmas = np.interp(ts, np.arange(T), train_sigmas)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.timesteps = ts.astype(np.int64).tolist()
        self._outputs: list[mx.array] = []

    @staticmethod
    def _alpha_sigma(sigma):
        alpha = np.float32(1) / _sqrt(sigma * sigma + 1)
        return alpha, sigma * alpha

    def step(self, model_output, t, sample, key=None, noise=None):
        i = self._index(t)
        self._i += 1
        alpha_s0, sigma_s0 = self._alpha_sigma(self.sigmas[i])
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[i + 1])
        if self.config.prediction_type == "epsilon":
            x0 = (sample - _f(sigma_s0) * model_output) / _f(alpha_s0)
        else:
            x0 = _f(alpha_s0) * sample - _f(sigma_s0) * model_output
        self._outputs = [*self._outputs[-1:], x0]
        with np.errstate(divide="ignore"):  # sigma_t = 0 on the last step: lambda_t = +inf, exp(-h) = 0
            lambda_t = np.log(alpha_t) - np.log(sigma_t)
            lambda_s0 = np.log(alpha_s0) - np.log(sigma_s0)
        h = lambda_t - lambda_s0
        phi = alpha_t * (np.exp(-h) - np.float32(1.0))
        if len(self._outputs) < 2 or i == len(self.timesteps) - 1:
            return _f(sigma_t / sigma_s0) * sample - _f(phi) * x0
        alpha_s1, sigma_s1 = self._alpha_sigma(self.sigmas[i - 1])
        lambda_s1 = np.log(alpha_s1) - np.log(sigma_s1)
        r0 = (lambda_s0 - lambda_s1) / h
        m1, m0 = self._outputs
        D1 = _f(np.float32(1.0) / r0) * (m0 - m1)
        return _f(sigma_t / sigma_s0) * sample - _f(phi) * m0 - _f(np.float32(0.5) * phi) * D1


def _sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional train timesteps of given sigmas, by linear interpolation in log-sigma (diffusers)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


class PNDMSampler(Sampler):
    """PLMS (pseudo linear multistep, Liu et al. 2022), diffusers' PNDMScheduler with skip_prk_steps.

    The SD1.5 default. Runs n + 1 model evaluations for n steps: the second evaluation repeats the
    first timestep to make a Heun-like start, then 2nd..4th-order Adams-Bashforth on the eps history.
    The Runge-Kutta warm-up (skip_prk_steps false) is not implemented.
    """

    def __init__(self, config: SchedulerConfig | dict):
        super().__init__(config)
        self.final_alpha_cumprod = np.float32(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def _set_timesteps(self, n):
        c = self.config
        base = _spaced(c.timestep_spacing, n, self.num_train_timesteps, c.steps_offset).round()[::-1]
        plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]  # the second entry repeats
        self.timesteps = plms.astype(np.int64).tolist()
        self._ets: list[mx.array] = []
        self._cur_sample = None

    def step(self, model_output, t, sample, key=None, noise=None):
        i = self._index(t)
        self._i += 1
        t = self.timesteps[i]
        ratio = self.num_train_timesteps // self.num_inference_steps
        prev = t - ratio
        if i == 1:  # the repeated timestep: average eps(x_t) and eps(x_{t-1}), restart from x_t
            prev, t = t, t + ratio
            eps = (model_output + self._ets[-1]) / 2
            sample, self._cur_sample = self._cur_sample, None
        else:
            self._ets = [*self._ets[-3:], model_output]
            e = self._ets
            if len(e) == 1:
                eps = model_output
                self._cur_sample = sample
            elif len(e) == 2:
                eps = (3 * e[-1] - e[-2]) / 2
            elif len(e) == 3:
                eps = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
            else:
                eps = (1 / 24) * (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4])
        return self._prev_sample(sample, t, prev, eps)

    def _prev_sample(self, sample, t, prev, model_output):
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        b_t, b_prev = 1 - a_t, 1 - a_prev
        if self.config.prediction_type == "v_prediction":
            model_output = _f(_sqrt(a_t)) * model_output + _f(_sqrt(b_t)) * sample
        # Formula (9) of the PNDM paper: x_{t-1} from x_t and eps in one closed form.
        sample_coeff = _sqrt(a_prev / a_t)
        denom = a_t * _sqrt(b_prev) + _sqrt(a_t * b_t * a_prev)
        return _f(sample_coeff) * sample - _f(a_prev - a_t) * model_output / _f(denom)


_SAMPLERS = {
    "ddim": (DDIMSampler, {}),
    "euler": (EulerSampler, {}),
    "euler_a": (EulerAncestralSampler, {}),
    "dpm++2m": (DPMSolverMultistepSampler, {}),
    "dpm++2m_karras": (DPMSolverMultistepSampler, {"use_karras_sigmas": True}),
    "pndm": (PNDMSampler, {}),
}
SAMPLERS = list(_SAMPLERS)


def make_sampler(name: str, config: SchedulerConfig | dict, **opts) -> Sampler:
    """A sampler by name (one of SAMPLERS); `opts` go to its constructor (e.g. eta for ddim)."""
    if name not in _SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    cls, defaults = _SAMPLERS[name]
    return cls(config, **{**defaults, **opts})
