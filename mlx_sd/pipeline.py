"""Text -> image with Stable Diffusion 1.x in MLX: tokenizer, CLIP, UNet, sampler, VAE, with CFG.

Layouts and units:
- latents are NHWC float32 `[N, H/8, W/8, 4]` in the UNet's (scaled) space, i.e.
  `vae_latent * scaling_factor`; they are divided by the factor before `vae.decode`;
- images leave as uint8 RGB PIL images (or float [0, 1] numpy `[N, H, W, 3]`, diffusers'
  `output_type="np"`);
- images are ordered prompt-major: `[p0 img0, p0 img1, ..., p1 img0, ...]`.

Defaults: `sampler="pndm"`, `steps=25`, `guidance_scale=7.5`. PNDM is the scheduler the SD1.5
repo ships (its own default is 50 steps); 25 steps is what the PyTorch trainer this project
replaces used for its validation images (`StableDiffusionPipeline` on the repo's PNDM), so the
defaults reproduce that script's pictures, not a new look. `dpm++2m_karras` at 20-25 steps is
the usual faster choice.

Precision: `dtype` float16 or bfloat16 casts the text encoder, UNet and VAE weights (and so their
activations; GroupNorm and softmax statistics stay float32 inside MLX's fused kernels). The
sampler's arithmetic (latents, sigmas, the CFG combination) stays float32, and the decoded image
leaves as float32. An image whose half-precision decode is not finite (float16's range is
+-65504) is decoded again in float32, so no image comes out black.

Seeds: every image has its own seed, hence its own initial noise (and its own noise for the
stochastic samplers), so an image does not depend on what else is in the batch. `seed=s` gives
image k (prompt-major) the seed `s + k`; a list gives one seed per image.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

from convert.model import resolve_model

from . import device
from .config import SchedulerConfig
from .io import atomic_file
from .model_folder import ModelFolder
from .schedulers import SAMPLERS, make_sampler

DEFAULT_SAMPLER = "pndm"
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.5
DTYPES = ("float32", "float16", "bfloat16")
_TEXT_CACHE = 256  # text embeddings kept (SD1.5: 77 x 768 values each, 118-236 KB)


def as_dtype(dtype) -> mx.Dtype:
    """"float16" or mx.float16 -> mx.float16; one of DTYPES."""
    if isinstance(dtype, mx.Dtype):
        dtype = str(dtype).rsplit(".", 1)[-1]
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return getattr(mx, dtype)


def _as_list(x: str | Sequence[str]) -> list[str]:
    return [x] if isinstance(x, str) else list(x)


def to_pil(images: mx.array | np.ndarray) -> list[Image.Image]:
    """Decoded images [N, H, W, 3] roughly in [-1, 1] -> uint8 RGB PIL images (diffusers' rounding)."""
    x = np.asarray(images, dtype=np.float32)
    x = np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    return [Image.fromarray(im) for im in x]


def save_png(image: Image.Image, path: Path, parameters: str | None = None) -> None:
    """Write a PNG atomically (temp file + rename), with generation settings in its "parameters" text."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def nearest_multiples(value, m: int) -> str:
    """The valid sizes either side of `value` (multiples of `m`), for an error message."""
    try:
        v = int(value)
    except (TypeError, ValueError):
        return f"{8 * m} or {9 * m}"
    lower = max(m, v // m * m)
    upper = max(m, -(-v // m) * m)
    return f"{lower}" if lower == upper else f"{lower} or {upper}"


class StableDiffusion:
    """A loaded SD1.x model: `generate(prompts) -> [PIL.Image]`, with stackable LoRA adapters.

    Build it with `from_folder` (converted folder, diffusers folder or Hub id), or directly from
    models already in memory (e.g. the UNet being trained, for validation images).
    """

    def __init__(self, tokenizer, text_encoder, unet, vae, scheduler_config: SchedulerConfig | dict,
                 compile: bool | None = None, dtype=None):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.unet = unet
        self.vae = vae
        self.scheduler_config = scheduler_config
        # mx.compile fuses the UNet's elementwise chains (GroupNorm, SiLU, GEGLU) into GPU kernels.
        # On the CPU backend it measured no faster on the tiny test model and its first call
        # JIT-builds C++ kernels for seconds, so None means "on the GPU only".
        self.compile = device.compile_sampler() if compile is None else bool(compile)
        self.adapters: list[tuple[str, float]] = []
        self._denoise_fn = None
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.unet_factor = 2 ** (len(unet.config.block_out_channels) - 1)
        self.latent_channels = unet.config.in_channels
        self._text_cache: dict[str, mx.array] = {}
        self._decode_stream = None
        if dtype is not None:
            self.set_dtype(dtype)

    @classmethod
    def from_folder(cls, path: str | Path, compile: bool | None = None, dtype=None) -> StableDiffusion:
        """Load from a converted folder; a diffusers folder or Hub id is converted once into the cache."""
        folder = ModelFolder(resolve_model(path))
        return cls(folder.tokenizer(), folder.text_encoder(), folder.unet(), folder.vae(),
                   folder.scheduler_config(), compile=compile, dtype=dtype)

    def set_dtype(self, dtype) -> None:
        """Cast the text encoder, UNet and VAE weights to `dtype` (float32, float16 or bfloat16), in place."""
        dt = as_dtype(dtype)
        for model in (self.text_encoder, self.unet, self.vae):
            model.set_dtype(dt)
        self._text_cache.clear()
        self._denoise_fn = None

    @property
    def dtype(self) -> mx.Dtype:
        return self._unet_dtype

    # ------------------------------------------------------------------ adapters

    def add_adapter(self, path, scale: float = 1.0) -> int:
        """Fuse a LoRA adapter (PEFT folder, diffusers or kohya file, or an `Adapter`) into the UNet,
        and its text-encoder part, if it has one, into the text encoder.

        Call once per adapter to stack several; the fused weights stay until the model is
        reloaded. Returns the number of modules changed.
        """
        from lora.formats import Adapter, apply_adapter, load_adapter

        adapter = path if isinstance(path, Adapter) else load_adapter(path)
        n = apply_adapter(self.unet, adapter, scale=scale, text_encoder=self.text_encoder)
        self.adapters.append((adapter.source or str(path), float(scale)))
        self._denoise_fn = None  # retrace against the new weights
        if adapter.text_encoder is not None:
            self._text_cache.clear()  # embeddings of the old text encoder
        return n

    # ------------------------------------------------------------------ text

    def encode_prompt(self, prompts: str | Sequence[str],
                      negative_prompts: str | Sequence[str] | None = "") -> tuple[mx.array, mx.array | None]:
        """Text embeddings `(cond [B,77,D], uncond [B,77,D] or None)`.

        `negative_prompts` is one string for all prompts or one per prompt; `None` skips the
        unconditional branch (no classifier-free guidance).
        """
        prompts = _as_list(prompts)
        cond = self._encode(prompts)
        if negative_prompts is None:
            return cond, None
        neg = _as_list(negative_prompts)
        if len(neg) == 1:
            neg = neg * len(prompts)
        if len(neg) != len(prompts):
            raise ValueError(f"{len(neg)} negative prompts for {len(prompts)} prompts: give one, or one per prompt")
        return cond, self._encode(neg)

    def _encode(self, texts: list[str]) -> mx.array:
        # Each distinct text is encoded once, and kept for the next batches: a bulk run repeats its
        # negative prompt in every batch, and a template's prompts in every image of a prompt.
        got = {t: self._text_cache[t] for t in dict.fromkeys(texts) if t in self._text_cache}
        new = [t for t in dict.fromkeys(texts) if t not in got]
        if new:
            emb = self.text_encoder(mx.array(self.tokenizer(new)))
            mx.eval(emb)
            for t, e in zip(new, emb):
                got[t] = e
                if len(self._text_cache) >= _TEXT_CACHE:
                    self._text_cache.pop(next(iter(self._text_cache)))
                self._text_cache[t] = e
        return mx.stack([got[t] for t in texts])

    # ------------------------------------------------------------------ sampling

    def _denoise(self):
        """eps(x, t, ctx, g) with classifier-free guidance, compiled once per shape."""
        if self._denoise_fn is not None:
            return self._denoise_fn
        unet = self.unet

        def guided(x, t, ctx, g):
            # One UNet call on [uncond; cond], as diffusers does: same numbers, one pass.
            out = unet(mx.concatenate([x, x]), mx.concatenate([t, t]), ctx)
            uncond, cond = mx.split(out, 2)
            return uncond + g * (cond - uncond)

        def plain(x, t, ctx, g):
            return unet(x, t, ctx)

        if self.compile:
            # The weights are passed as implicit inputs, so later in-place changes (an
            # adapter fused, LoRA layers trained between validations) are seen without retracing.
            guided = mx.compile(guided, inputs=unet.state)
            plain = mx.compile(plain, inputs=unet.state)
        self._denoise_fn = (guided, plain)
        return self._denoise_fn

    def check_size(self, height: int, width: int) -> tuple[int, int]:
        """Latent size for an image size; a clear error if the model cannot make that size."""
        m = self.vae_factor * self.unet_factor
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, (int, np.integer)) or v <= 0 or v % m:
                raise ValueError(
                    f"{name}={v}: must be a positive multiple of {m} for this model (the VAE downsamples "
                    f"by {self.vae_factor} and the UNet by {self.unet_factor} more); the nearest are "
                    f"{nearest_multiples(v, m)}")
        return height // self.vae_factor, width // self.vae_factor

    def _seeds(self, seed, n: int) -> list[int]:
        if seed is None:
            seed = secrets.randbits(31)
        if isinstance(seed, (int, np.integer)):
            seeds = [int(seed) + k for k in range(n)]
        else:
            seeds = [int(s) for s in seed]
        if len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds for {n} images: give one int, or one seed per image")
        if min(seeds) < 0 or max(seeds) >= 2**63:
            raise ValueError(f"seeds must be in [0, 2**63), got {min(seeds)}..{max(seeds)}")
        return seeds

    def generate(
        self,
        prompts: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        num_images_per_prompt: int = 1,
        steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE,
        sampler: str = DEFAULT_SAMPLER,
        seed: int | Sequence[int] | None = None,
        height: int = 512,
        width: int = 512,
        latents: mx.array | np.ndarray | None = None,
        return_latents: bool = False,
        output_type: str = "pil",
        batch_size: int | None = None,
        progress: bool = False,
        **sampler_opts,
    ):
        """Images for `prompts` (a string or a list), `num_images_per_prompt` each, prompt-major.

        - `guidance_scale` > 1 runs classifier-free guidance: the UNet sees [uncond; cond] in one
          batch and `eps = eps_u + g (eps_c - eps_u)`; <= 1 skips the unconditional branch.
        - `seed`: an int (image k gets `seed + k`), one seed per image, or None (random).
        - `latents`: optional initial noise `[N, H/8, W/8, 4]` NHWC (N = all images), scaled by the
          sampler's `init_noise_sigma` as diffusers does; otherwise drawn from the seeds.
        - `output_type`: "pil" (list of PIL images), "np" (float32 [N,H,W,3] in [0, 1]) or
          "latent" (the final latents, not decoded).
        - `return_latents`: also return the final latents: `(images, latents)`.
        - `batch_size`: images per UNet batch (default: all at once); results do not depend on it.
        - `sampler_opts` go to the sampler (e.g. `eta` for ddim).
        """
        prompts = _as_list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type={output_type!r}: expected 'pil', 'np' or 'latent'")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt={num_images_per_prompt}: must be >= 1")
        h, w = self.check_size(height, width)
        n = len(prompts) * num_images_per_prompt
        seeds = self._seeds(seed, n)
        if latents is not None:
            latents = mx.array(np.asarray(latents, dtype=np.float32)) if not isinstance(latents, mx.array) else latents
            want = (n, h, w, self.latent_channels)
            if tuple(latents.shape) != want:
                raise ValueError(f"latents have shape {tuple(latents.shape)}; expected {want} (NHWC, one per image)")
        use_cfg = guidance_scale > 1.0
        cond, uncond = self.encode_prompt(prompts, negative_prompt if use_cfg else None)

        def rep(e):  # prompt-major
            return mx.repeat(e, num_images_per_prompt, axis=0)

        cond = rep(cond)
        uncond = rep(uncond) if use_cfg else None

        bs = n if not batch_size else int(batch_size)
        outs, lats = [], []
        pending = None  # the previous batch's decode, running while this batch samples
        for s in range(0, n, bs):
            sl = slice(s, min(s + bs, n))
            ctx = mx.concatenate([uncond[sl], cond[sl]]) if use_cfg else cond[sl]
            init = latents[sl] if latents is not None else None
            z = self._sample(ctx, seeds[sl], h, w, steps, guidance_scale, use_cfg, sampler, init,
                             progress, sampler_opts)
            lats.append(z)
            if output_type != "latent":
                if pending is not None:
                    outs.append(self._decode_finish(*pending))
                pending = (z, self._decode_start(z))
        if pending is not None:
            outs.append(self._decode_finish(*pending))
        z = mx.concatenate(lats) if len(lats) > 1 else lats[0]
        if output_type == "latent":
            images = z
        else:
            x = np.concatenate(outs)
            images = to_pil(x) if output_type == "pil" else np.clip(x / 2 + 0.5, 0.0, 1.0)
        return (images, z) if return_latents else images

    def stream(self, batches: Iterable[tuple[Sequence[str], Sequence[int]]], negative_prompt: str = "",
               steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE, sampler: str = DEFAULT_SAMPLER,
               height: int = 512, width: int = 512, overlap: bool = True, **sampler_opts) -> Iterator[np.ndarray]:
        """Bulk generation: for each `(prompts, seeds)` batch, in order, its images as uint8 `[b, H, W, 3]`.

        Each image is the one `generate(prompt, seed=seed, ...)` makes in a batch of the same size
        (batch size changes only float rounding, at most 1 level of uint8 here). With `overlap`, a batch's VAE decode
        runs on a second stream while the next batch is sampled, so each batch is yielded once the
        next one is sampled (or the input ends); an empty batch yields an empty array in its place.
        On Ctrl-C during sampling the finished batch still waiting is yielded before the interrupt
        is raised, so no finished image is lost.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        h, w = self.check_size(height, width)
        use_cfg = guidance_scale > 1.0
        queue: list = []  # batches sampled, not yet yielded: (z, decode in flight) or None (empty)

        def finish(item) -> np.ndarray:
            if item is None:
                return np.zeros((0, height, width, 3), np.uint8)
            return np.stack([np.asarray(im) for im in to_pil(self._decode_finish(*item))])

        for prompts, seeds in batches:
            prompts, seeds = list(prompts), list(seeds)
            if not prompts:
                queue.append(None)
            else:
                seeds = self._seeds(seeds, len(prompts))
                try:
                    cond, uncond = self.encode_prompt(prompts, negative_prompt if use_cfg else None)
                    ctx = mx.concatenate([uncond, cond]) if use_cfg else cond
                    z = self._sample(ctx, seeds, h, w, steps, guidance_scale, use_cfg, sampler, None, False,
                                     sampler_opts)
                except KeyboardInterrupt:
                    for item in queue:
                        yield finish(item)
                    raise
                queue.append((z, self._decode_start(z)))
                if not overlap:
                    yield finish(queue.pop(0))
            while len(queue) > 1 or (queue and queue[0] is None):
                yield finish(queue.pop(0))
        while queue:
            yield finish(queue.pop(0))

    def _decode_start(self, z: mx.array) -> mx.array:
        """Start decoding final latents on the decode stream; `_decode_finish` collects the result."""
        if self._decode_stream is None:
            self._decode_stream = mx.new_stream(mx.default_device())
        with mx.stream(self._decode_stream):
            x = self.vae.decode((z / self.vae.scaling_factor).astype(self._vae_dtype)).astype(mx.float32)
        mx.async_eval(x)
        return x

    def _decode_finish(self, z: mx.array, x: mx.array) -> np.ndarray:
        """The decoded images [b, H, W, 3] float32; any non-finite one is decoded again in float32."""
        out = np.array(x)
        bad = ~np.isfinite(out).reshape(len(out), -1).all(axis=1)
        if bad.any() and self._vae_dtype != mx.float32:
            half = self._vae_dtype
            self.vae.set_dtype(mx.float32)  # exact: every half value is a float32 value
            try:
                redo = self.vae.decode(z[mx.array(np.nonzero(bad)[0])] / self.vae.scaling_factor)
                out[bad] = np.array(redo.astype(mx.float32))
            finally:
                self.vae.set_dtype(half)
        return out

    @property
    def _unet_dtype(self):
        return self.unet.conv_in.weight.dtype

    @property
    def _vae_dtype(self):
        return self.vae.post_quant_conv.weight.dtype

    def _sample(self, ctx, seeds, h, w, steps, guidance_scale, use_cfg, sampler_name, init, progress, opts):
        sampler = make_sampler(sampler_name, self.scheduler_config, **opts)
        sampler.set_timesteps(steps)
        timesteps = sampler.timesteps
        b = len(seeds)
        shape = (1, h, w, self.latent_channels)
        # Per-image keys: initial noise from one half, per-step noise (stochastic samplers) from the other.
        keys = [mx.random.split(mx.random.key(s)) for s in seeds]
        if init is None:
            init = mx.concatenate([mx.random.normal(shape, key=k[0]) for k in keys])
        x = init.astype(mx.float32) * sampler.init_noise_sigma
        step_keys = [mx.random.split(k[1], len(timesteps)) for k in keys] if sampler.stochastic else None
        guided, plain = self._denoise()
        fn = guided if use_cfg else plain
        ctx = ctx.astype(self._unet_dtype)
        g = mx.array(guidance_scale, dtype=mx.float32)
        mx.eval(x, ctx)
        it = timesteps
        if progress:
            from tqdm import tqdm

            it = tqdm(timesteps, desc="sampling", unit="step", leave=False)
        for j, t in enumerate(it):
            x_in = sampler.scale_model_input(x, t).astype(self._unet_dtype)
            tt = mx.full((b,), float(t), dtype=mx.float32)
            eps = fn(x_in, tt, ctx, g).astype(mx.float32)
            noise = None
            if step_keys is not None:
                noise = mx.concatenate([mx.random.normal(shape, key=sk[j]) for sk in step_keys])
            x = sampler.step(eps, t, x, noise=noise)
            mx.eval(x)
        return x
