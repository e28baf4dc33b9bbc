"""MLX's GPU path vs torch on one CUDA GPU: training step, sampling and feature extraction.

MLX's CUDA backend shares the GPU-side machinery with Metal (command buffers, lazy graphs,
mx.compile's fused kernels, the memory limit's waits), so an NVIDIA GPU is a stand-in for a Mac's
GPU where no Mac is at hand. This runs, in order of importance, each part in its own process
(a crash or a hang loses that part only), SD1.5 shapes with random weights, float32 unless named:

1. training step, 512 px batch 2, LoRA r=8, AdamW: the product's `TrainStep` on its UNet with each
   GPU-column choice of `mlx_sd.device` and each CPU-only path forced on (memory budget, own conv
   gradients, chunked attention, chunks on two streams), vs diffusers+peft on torch
   (benchmarks/torch_reference.py): s/step (median after warm-up), first step (compilation) and
   peak memory (MLX: `mx.get_peak_memory`; torch: `torch.cuda.max_memory_allocated`);
2. sampling, 512 px, 25 PNDM steps, guidance 7.5, batch 4, float32 and float16: the product's
   `StableDiffusion.generate`, compiled and not, vs diffusers' StableDiffusionPipeline: images/min;
3. feature extraction, batch 16: the product's InceptionV3 (299 px), CLIP ViT-L/14 image tower and
   DINOv2 ViT-L/14 (224 px) vs torchvision's inception_v3 and transformers' CLIPVisionModelWithProjection
   and Dinov2Model: images/s.

MLX runs on its default device (the GPU when MLX's CUDA or Metal backend is installed); torch on
CUDA, or MPS, else the CPU. Each figure is printed as it comes and appended to the JSON file
(`--out`), so a run stopped at its time limit keeps what it measured; the tables come last, each
MLX figure beside torch's. Each part stops starting new measurements at its share of `--budget_s`.
Note: MLX runs float32 matmuls in TF32 where the GPU has it (MLX_ENABLE_TF32, default on); torch
does not by default (its cuDNN convolutions do); the JSON records both settings.

    PYTHONUNBUFFERED=1 python benchmarks/gpu_proxy.py --out gpu_proxy.json
    python benchmarks/gpu_proxy.py --tiny          # tiny models at 64 px: checks the script on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a professional product photo of black leather casual shoes, side view, white background"
# (part, worker, seconds of a 400 s budget in which it may start measurements); each then has 40 s more
# to finish. MLX's first compiled step on CUDA JIT-compiles its fused kernels (NVRTC), minutes for a
# training step, hence the large share; the kernels are cached on disk for the workers after it.
PARTS = [("train", "train_torch", 28), ("train", "train_mlx", 220), ("sample", "sample_mlx", 48),
         ("sample", "sample_torch", 32), ("features", "features_mlx", 28), ("features", "features_torch", 28)]
T0 = time.time()


def note(msg: str) -> None:
    """A progress line (not a figure): the parent prints it as it comes."""
    print(f"# {time.time() - T0:6.1f} s  {msg}", flush=True)


def watch_jit_cache(mx, every: float = 20.0) -> None:
    """Reports every `every` s how many kernels MLX's CUDA JIT cache holds (it grows while NVRTC compiles)."""
    import tempfile

    root = Path(os.environ.get("MLX_PTX_CACHE_DIR") or Path(tempfile.gettempdir()) / "mlx" / mx.__version__ / "ptx")

    def loop():
        while True:
            time.sleep(every)
            n = sum(f.endswith(".ptx") for _, _, files in os.walk(root) for f in files) if root.exists() else 0
            note(f"JIT cache: {n} kernels")

    if mx.default_device().type == mx.gpu:
        threading.Thread(target=loop, daemon=True).start()


def shape(tiny: bool) -> dict:
    if tiny:
        return {"size": 64, "batch": 2, "sample_batch": 2, "steps": 3, "feature_batch": 2, "chunk": 16,
                "warmup": 1, "timed": 2, "feature_timed": 2}
    return {"size": 512, "batch": 2, "sample_batch": 4, "steps": 25, "feature_batch": 16, "chunk": 1024,
            "warmup": 1, "timed": 3, "feature_timed": 5}


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


# --------------------------------------------------------------------------- MLX workers
def mlx_setup():
    import mlx_sd  # noqa: F401  (before mlx.core, as the product imports it)
    import mlx.core as mx

    watch_jit_cache(mx)
    return mx


def mlx_meta(mx) -> dict:
    return {"mlx": mx.__version__, "device": str(mx.default_device()),
            "tf32": os.environ.get("MLX_ENABLE_TF32", "default (1)")}


def mlx_configs(tiny: bool) -> dict:
    from mlx_sd.config import read_json
    from mlx_sd.configs import SD15

    if tiny:
        from mlx_sd import demo

        return {"unet": demo.UNET, "vae": demo.VAE, "text_encoder": demo.TEXT,
                "scheduler": read_json(SD15 / "scheduler" / "scheduler_config.json")}
    return {n: read_json(SD15 / n / "config.json") for n in ("unet", "vae", "text_encoder")} | {
        "scheduler": read_json(SD15 / "scheduler" / "scheduler_config.json")}


def force(conv: bool, chunk: int, streams: str):
    """Set the device switches the training step reads, whatever device this is."""
    import mlx.core as mx

    from mlx_sd import attention, device

    device.custom_conv_gradients = lambda: conv
    device.attention_chunk = lambda: chunk
    if streams == "cpu2":  # the CPU column's two CPU streams (threads): attention then computes on the CPU
        lanes = attention._cpu_streams(2)
    elif streams == "gpu2":
        lanes = (mx.default_stream(mx.default_device()), mx.new_stream(mx.default_device()))
    else:
        lanes = (None,)
    attention.chunk_streams = lambda: lanes


def train_mlx(a, sh, deadline):
    mx = mlx_setup()
    from lora import LoRAConfig, inject_lora, trainable_count
    from mlx_sd import memory
    from mlx_sd.config import UNetConfig
    from mlx_sd.schedulers import NoiseSchedule
    from mlx_sd.training import LossConfig, TrainStep, make_optimizer
    from mlx_sd.unet import UNet2DConditionModel

    cfg = mlx_configs(a.tiny)
    mx.random.seed(0)
    note("building the UNet")
    config = UNetConfig.from_diffusers(cfg["unet"])
    unet = UNet2DConditionModel(config)
    inject_lora(unet, LoRAConfig(r=8, alpha=16))
    mx.eval(unet.parameters())
    schedule = NoiseSchedule(cfg["scheduler"])
    h, b = sh["size"] // 8, sh["batch"]
    mean, std = mx.random.normal((b, h, h, 4)), mx.full((b, h, h, 4), 0.1)
    ctx = mx.random.normal((b, 77, config.cross_attention_dim))
    mx.eval(mean, std, ctx)
    budget_gb = memory.weights_gb(unet) + memory.CHECKPOINTING_HEADROOM_GB
    gpu = mx.default_device().type == mx.gpu
    chunk = sh["chunk"]
    # (label, checkpointing, budget, conv gradients, attention chunk, streams, compiled). The uncompiled
    # step first: it needs few JIT kernels, so a figure comes even if the compiled step's JIT runs long.
    variants = [("GPU column, ckpt on, not compiled", True, False, False, 0, "default", False),
                ("GPU column, ckpt on", True, False, False, 0, "default", True),
                ("ckpt on + memory budget", True, True, False, 0, "default", True),
                ("ckpt on + own conv gradients", True, False, True, 0, "default", True),
                ("ckpt on + chunked attention", True, False, False, chunk, "default", True),
                ("ckpt on + chunks on 2 GPU streams", True, False, False, chunk, "gpu2", True),
                ("GPU column, ckpt off", False, False, False, 0, "default", True),
                ("ckpt on + chunked attention + budget", True, True, False, chunk, "default", True)]
    if gpu:  # two CPU streams would run the attention on the CPU: not a GPU option, so the GPU's one stream
        variants.append(("CPU column on the GPU's stream (budget, conv, chunks)", True, True, True, chunk, "default",
                         True))
    else:
        variants.append(("CPU column (budget, conv, chunks, 2 CPU streams)", True, True, True, chunk, "cpu2", True))
    variants.append(("ckpt off + own conv gradients", False, False, True, 0, "default", True))
    last = 0.0
    for label, ckpt, budget, conv, ch, streams, compiled in variants:
        row = {"part": "train", "side": "mlx", "name": label, "checkpointing": ckpt, "budget": budget,
               "conv_gradients": conv, "attention_chunk": ch, "streams": streams, "compiled": compiled,
               **mlx_meta(mx)}
        if streams == "gpu2" and not gpu:
            emit({**row, "skipped": "no GPU stream on this device"})
            continue
        if time.time() + max(10.0, 1.5 * last) > deadline:
            emit({**row, "skipped": "out of time"})
            continue
        t_start = time.time()
        limit = None
        try:
            force(conv, ch, streams)
            unet.gradient_checkpointing = ckpt
            if budget:
                limit = memory.set_budget(budget_gb)
                row["budget_gb"] = budget_gb
            step = TrainStep(unet, make_optimizer(1e-4, "constant", 0, 100), schedule, LossConfig(),
                             compile=compiled)
            mx.clear_cache()
            mx.random.seed(1)
            warmup, timed = sh["warmup"], sh["timed"]
            times = []
            for i in range(1 + warmup + timed):
                if i == 1:
                    mx.reset_peak_memory()
                t = time.perf_counter()
                loss, acc = step.grad_step(mean, std, ctx, step.zero_grads())
                norm = step.apply_update(acc)
                mx.eval(loss, norm, unet.trainable_parameters(), step.optimizer.state)
                times.append(time.perf_counter() - t)
                if i == 0:
                    note(f"{label}: first step {times[0]:.1f} s")
                    if time.time() > deadline:  # late: one timed step, no warm-up
                        warmup, timed = 0, 1
            steady = times[1 + warmup:] or times[1:] or times
            row.update(s_step=statistics.median(steady), first_s=times[0], times=times,
                       peak_gb=mx.get_peak_memory() / 1e9, loss=float(loss.item()),
                       trainable=trainable_count(unet))
        except Exception as e:  # one variant failing must not stop the others
            row["error"] = f"{type(e).__name__}: {e}"[:400]
        finally:
            if limit is not None:
                mx.set_memory_limit(limit)
        last = time.time() - t_start
        emit(row)


def mlx_pipeline(cfg, mx):
    from mlx_sd.clip import CLIPTextModel
    from mlx_sd.config import CLIPTextConfig, SchedulerConfig, UNetConfig, VAEConfig
    from mlx_sd.configs import SD15
    from mlx_sd.tokenizer import Tokenizer
    from mlx_sd.unet import UNet2DConditionModel
    from mlx_sd.vae import AutoencoderKL

    mx.random.seed(0)
    models = (CLIPTextModel(CLIPTextConfig.from_diffusers(cfg["text_encoder"])),
              UNet2DConditionModel(UNetConfig.from_diffusers(cfg["unet"])),
              AutoencoderKL(VAEConfig.from_diffusers(cfg["vae"])))
    mx.eval([m.parameters() for m in models])
    return (Tokenizer(SD15 / "tokenizer"), *models, SchedulerConfig.from_diffusers(cfg["scheduler"]))


def sample_mlx(a, sh, deadline):
    mx = mlx_setup()
    from mlx_sd.pipeline import StableDiffusion

    parts = mlx_pipeline(mlx_configs(a.tiny), mx)
    n, size = sh["sample_batch"], sh["size"]
    kw = {"guidance_scale": 7.5, "sampler": "pndm", "height": size, "width": size, "output_type": "np"}
    last = 0.0
    for dtype in a.mlx_sample_dtypes:
        for compiled in (True, False):
            row = {"part": "sample", "side": "mlx", "dtype": dtype, "compiled": compiled,
                   "name": f"{dtype}{', compiled' if compiled else ''}", "batch": n, "steps": sh["steps"],
                   **mlx_meta(mx)}
            if time.time() + max(10.0, 1.2 * last) > deadline:
                emit({**row, "skipped": "out of time"})
                continue
            t_start = time.time()
            try:
                sd = StableDiffusion(*parts, compile=compiled, dtype=dtype)
                mx.clear_cache()
                t = time.perf_counter()
                sd.generate([PROMPT] * n, steps=2, seed=0, **kw)  # compiles, warms the decoder
                warm = time.perf_counter() - t
                note(f"{row['name']}: warm-up {warm:.1f} s")
                mx.reset_peak_memory()
                t = time.perf_counter()
                _, z = sd.generate([PROMPT] * n, steps=sh["steps"], seed=1, return_latents=True, **kw)
                dt = time.perf_counter() - t
                row.update(seconds=dt, img_min=60 * n / dt, warmup_s=warm, peak_gb=mx.get_peak_memory() / 1e9)
                # A non-finite half-precision decode is redone in float32 (inside the time above): say so.
                half = sd.vae.decode((z / sd.vae.scaling_factor).astype(sd.vae.post_quant_conv.weight.dtype))
                row["latents_finite"] = bool(mx.all(mx.isfinite(z)).item())
                row["decode_finite"] = bool(mx.all(mx.isfinite(half)).item())
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:400]
            last = time.time() - t_start
            emit(row)


def features_mlx(a, sh, deadline):
    mx = mlx_setup()
    import numpy as np

    from mlx_sd.metrics.clip_model import CLIPModel, CLIPModelConfig
    from mlx_sd.metrics.dinov2 import Dinov2Config, Dinov2Model
    from mlx_sd.metrics.inception import FIDInceptionV3

    vision, text, dino = feature_configs(a.tiny)
    makers = {"inception": lambda: (FIDInceptionV3().pool3, 299),
              "clip": lambda: ((m := CLIPModel(CLIPModelConfig.from_transformers(
                  {"vision_config": vision, "text_config": text,
                   "projection_dim": vision["projection_dim"]}))).image_embeds, m.config.vision.image_size),
              "dinov2": lambda: (Dinov2Model(Dinov2Config.from_transformers(dino)), 224)}
    for name, make in makers.items():
        row = {"part": "features", "side": "mlx", "name": name, "batch": sh["feature_batch"], **mlx_meta(mx)}
        if time.time() + 5 > deadline:
            emit({**row, "skipped": "out of time"})
            continue
        try:
            mx.random.seed(0)
            f, size = make()
            x = mx.array(np.random.default_rng(0).uniform(-1, 1, (sh["feature_batch"], size, size, 3))
                         .astype(np.float32))
            mx.reset_peak_memory()
            times = []
            for _ in range(1 + sh["feature_timed"]):
                t = time.perf_counter()
                mx.eval(f(x))
                times.append(time.perf_counter() - t)
            s = statistics.median(times[1:])
            row.update(size=size, seconds=s, img_s=sh["feature_batch"] / s, first_s=times[0],
                       peak_gb=mx.get_peak_memory() / 1e9)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:400]
        emit(row)


def feature_configs(tiny: bool):
    """(CLIP vision config with projection_dim, CLIP text config, DINOv2 config), as transformers takes them."""
    sys.path.insert(0, str(ROOT / "tests"))
    from metrics_reference import CLIP_L14_TEXT, CLIP_L14_VISION, DINOV2_L14

    if tiny:
        from mlx_sd.metrics.tiny import TINY_CLIP, TINY_DINOV2

        return ({**TINY_CLIP["vision_config"], "projection_dim": TINY_CLIP["projection_dim"]},
                TINY_CLIP["text_config"], TINY_DINOV2)
    return CLIP_L14_VISION, CLIP_L14_TEXT, DINOV2_L14


# --------------------------------------------------------------------------- torch workers
def torch_setup():
    import torch

    dev = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    meta = {"torch": torch.__version__, "device": dev,
            "gpu": torch.cuda.get_device_name() if dev == "cuda" else None,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32}
    return torch, dev, meta


def sync(torch, dev):
    if dev == "cuda":
        torch.cuda.synchronize()
    elif dev == "mps":
        torch.mps.synchronize()


def reset_peak(torch, dev):
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gb(torch, dev):
    return torch.cuda.max_memory_allocated() / 1e9 if dev == "cuda" else None


def torch_configs(tiny: bool) -> dict:
    from mlx_sd.configs import SD15

    if tiny:
        from mlx_sd import demo

        cfg = {"unet": demo.UNET, "vae": demo.VAE, "text_encoder": demo.TEXT}
    else:
        cfg = {n: json.loads((SD15 / n / "config.json").read_text()) for n in ("unet", "vae", "text_encoder")}
    cfg["scheduler"] = json.loads((SD15 / "scheduler" / "scheduler_config.json").read_text())
    return cfg


def train_torch(a, sh, deadline):
    torch, dev, meta = torch_setup()
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from benchmarks.torch_reference import add_lora, train_step

    cfg = torch_configs(a.tiny)
    h, b = sh["size"] // 8, sh["batch"]
    torch.manual_seed(0)
    with torch.device(dev):  # random init on the device: seconds instead of a CPU init and a copy
        unet = UNet2DConditionModel.from_config(cfg["unet"])
        params, _ = add_lora(unet, False)
    sched = DDPMScheduler.from_config(cfg["scheduler"])
    latents = torch.randn(b, 4, h, h, device=dev)
    ctx = torch.randn(b, 77, cfg["unet"]["cross_attention_dim"], device=dev)
    for label, ckpt, tf32 in (("ckpt off", False, False), ("ckpt on", True, False),
                              ("ckpt off, TF32 matmuls", False, True)):
        row = {"part": "train", "side": "torch", "name": label, "checkpointing": ckpt, **meta, "tf32_matmul": tf32}
        if time.time() + 5 > deadline:
            emit({**row, "skipped": "out of time"})
            continue
        try:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            unet.enable_gradient_checkpointing() if ckpt else unet.disable_gradient_checkpointing()
            opt = torch.optim.AdamW(params, lr=1e-4)  # as add_lora makes it
            times = []
            for i in range(1 + sh["warmup"] + sh["timed"]):
                if i == 1:
                    reset_peak(torch, dev)
                t = time.perf_counter()
                loss = train_step(unet, sched, params, opt, latents, ctx)
                sync(torch, dev)
                times.append(time.perf_counter() - t)
            row.update(s_step=statistics.median(times[1 + sh["warmup"]:]), first_s=times[0], times=times,
                       peak_gb=peak_gb(torch, dev), loss=float(loss.item()),
                       trainable=sum(p.numel() for p in params))
            del opt
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:400]
        if dev == "cuda":
            torch.cuda.empty_cache()
        emit(row)


def sample_torch(a, sh, deadline):
    import numpy as np

    torch, dev, meta = torch_setup()
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from mlx_sd.configs import SD15

    cfg = torch_configs(a.tiny)
    torch.manual_seed(0)
    with torch.device(dev):
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL.from_config(cfg["vae"]), unet=UNet2DConditionModel.from_config(cfg["unet"]),
            text_encoder=CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
            tokenizer=CLIPTokenizer.from_pretrained(SD15 / "tokenizer"),
            scheduler=PNDMScheduler.from_config(cfg["scheduler"]),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    n, size = sh["sample_batch"], sh["size"]
    kw = {"guidance_scale": 7.5, "height": size, "width": size, "output_type": "np"}
    for dtype in ("float32", "float16"):
        row = {"part": "sample", "side": "torch", "dtype": dtype, "name": dtype, "batch": n, "steps": sh["steps"],
               **meta}
        if time.time() + 10 > deadline:
            emit({**row, "skipped": "out of time"})
            continue
        try:
            if dtype == "float16" and dev == "cpu":
                raise RuntimeError("float16 sampling is not timed on the CPU")
            pipe = pipe.to(dev, getattr(torch, dtype))
            with torch.no_grad():
                t = time.perf_counter()
                pipe([PROMPT] * n, num_inference_steps=2, generator=torch.Generator(dev).manual_seed(0), **kw)
                warm = time.perf_counter() - t
                reset_peak(torch, dev)
                t = time.perf_counter()
                images = pipe([PROMPT] * n, num_inference_steps=sh["steps"],
                              generator=torch.Generator(dev).manual_seed(1), **kw).images
                sync(torch, dev)
                dt = time.perf_counter() - t
            row.update(seconds=dt, img_min=60 * n / dt, warmup_s=warm, peak_gb=peak_gb(torch, dev),
                       images=len(images), images_finite=bool(np.isfinite(images).all()))
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:400]
        emit(row)


def features_torch(a, sh, deadline):
    torch, dev, meta = torch_setup()
    vision, text, dino = feature_configs(a.tiny)

    def inception():
        from torchvision.models import inception_v3

        m = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=False)
        m.fc = torch.nn.Identity()  # the 2048-d pool features, as FID takes them
        return m, (lambda x: m(x)), 299

    def clip():
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        m = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision))
        return m, (lambda x: m(pixel_values=x).image_embeds), vision["image_size"]

    def dinov2():
        from transformers import Dinov2Config, Dinov2Model

        m = Dinov2Model(Dinov2Config(**dino))
        return m, (lambda x: m(pixel_values=x).pooler_output), 224

    for name, make in (("inception", inception), ("clip", clip), ("dinov2", dinov2)):
        row = {"part": "features", "side": "torch", "name": name, "batch": sh["feature_batch"], **meta}
        if time.time() + 5 > deadline:
            emit({**row, "skipped": "out of time"})
            continue
        try:
            torch.manual_seed(0)
            with torch.device(dev):
                model, f, size = make()
            model.to(dev).eval()
            x = torch.rand(sh["feature_batch"], 3, size, size, device=dev) * 2 - 1
            reset_peak(torch, dev)
            times = []
            with torch.no_grad():
                for _ in range(1 + sh["feature_timed"]):
                    t = time.perf_counter()
                    f(x)
                    sync(torch, dev)
                    times.append(time.perf_counter() - t)
            s = statistics.median(times[1:])
            row.update(size=size, seconds=s, img_s=sh["feature_batch"] / s, first_s=times[0],
                       peak_gb=peak_gb(torch, dev))
            del model
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:400]
        emit(row)


WORKERS = {f.__name__: f for f in (train_mlx, train_torch, sample_mlx, sample_torch, features_mlx, features_torch)}


# --------------------------------------------------------------------------- parent
def run_worker(name: str, args, cap_s: float, start_by: float, log, on_row) -> list[dict]:
    """Runs one worker in its own process, passing each row to `on_row` as it comes; returns the
    rows about the worker itself (stopped at its cap, or crashed)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--deadline", str(start_by)]
    cmd += (["--tiny"] if args.tiny else []) + ["--mlx_sample_dtypes", *args.mlx_sample_dtypes]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    lines: queue.Queue = queue.Queue()
    err: list[str] = []
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True).start()
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
    extra, last, stop = [], None, time.time() + cap_s
    while True:
        try:
            line = lines.get(timeout=max(0.1, stop - time.time()))
        except queue.Empty:
            proc.kill()
            extra.append({"worker": name, "error": f"stopped at its {cap_s:.0f} s cap"})
            print(f"  {name}: stopped at its {cap_s:.0f} s cap", flush=True)
            break
        if line is None:
            break
        if line.startswith("{"):
            last = json.loads(line)
            on_row(last)
        elif line.startswith("#"):
            print(f"  {name} {line.rstrip()}", flush=True)
    proc.wait()
    time.sleep(0.2)  # let the stderr thread finish reading
    log.write(f"==== {name} (exit {proc.returncode})\n{''.join(err)}")
    log.flush()
    if proc.returncode and not extra:
        tail = " | ".join(x.strip() for x in err[-4:])
        after = last and last.get("name")
        extra.append({"worker": name, "error": f"exit {proc.returncode} after {after}: {tail}"[:600]})
        print(f"  {name} failed (exit {proc.returncode}): {tail}", flush=True)
    return extra


def show(r: dict) -> None:
    keys = ("s_step", "first_s", "img_min", "img_s", "peak_gb", "error", "skipped")
    brief = ", ".join(f"{k}={r[k]:.3f}" if isinstance(r.get(k), float) else f"{k}={r[k]}" for k in keys if k in r)
    print(f"  [{r.get('part')}/{r.get('side')}] {r.get('name')}: {brief}", flush=True)


def fmt(v, digits=2, unit=""):
    return "-" if v is None else f"{v:.{digits}f}{unit}"


def tables(res: dict) -> list[str]:
    rows = [r for rs in res["workers"].values() for r in rs if "part" in r]

    def pick(part, side, **kw):
        return [r for r in rows if r["part"] == part and r["side"] == side
                and all(r.get(k) == v for k, v in kw.items())]

    def one(part, side, **kw):
        found = [r for r in pick(part, side, **kw) if "error" not in r and "skipped" not in r]
        return found[0] if found else {}

    out = []
    ref = {ck: one("train", "torch", checkpointing=ck, tf32_matmul=False) for ck in (False, True)}
    base = {ck: one("train", "mlx", name=f"GPU column, ckpt {'on' if ck else 'off'}") for ck in (False, True)}
    out += ["", "1. Training step, SD1.5 UNet, LoRA r=8, AdamW, 512 px batch 2, float32 (tiny: 64 px)",
            "| MLX variant | s/step | first step s | peak GB | vs GPU column | torch s/step | torch peak GB "
            "| MLX/torch |",
            "|---|---|---|---|---|---|---|---|"]
    for r in pick("train", "mlx"):
        ck = r.get("checkpointing")
        t, b = ref.get(ck, {}), base.get(ck, {})
        s = r.get("s_step")
        note = r.get("error") or r.get("skipped")
        out.append(f"| {r['name']} | {fmt(s, 3)} | {fmt(r.get('first_s'), 1)} | {fmt(r.get('peak_gb'))} | "
                   f"{fmt(s / b['s_step'] if s and b.get('s_step') else None, 2, 'x')} | {fmt(t.get('s_step'), 3)} | "
                   f"{fmt(t.get('peak_gb'))} | {fmt(s / t['s_step'] if s and t.get('s_step') else None, 2, 'x')} |"
                   + (f" {note[:120]}" if note else ""))
    for r in pick("train", "torch"):
        note = r.get("error") or r.get("skipped")
        out.append(f"| torch {r['name']} | {fmt(r.get('s_step'), 3)} | {fmt(r.get('first_s'), 1)} | "
                   f"{fmt(r.get('peak_gb'))} | | | | |" + (f" {note[:120]}" if note else ""))
    out += ["", "2. Sampling, 512 px, 25 PNDM steps, guidance 7.5, batch 4 (tiny: 64 px, 3 steps, batch 2)",
            "| dtype | MLX compiled img/min | MLX plain img/min | torch img/min | compiled/torch | plain/torch | "
            "MLX peak GB (compiled) | torch peak GB |", "|---|---|---|---|---|---|---|---|"]
    for dt in ("float32", "float16"):
        c, p, t = one("sample", "mlx", dtype=dt, compiled=True), one("sample", "mlx", dtype=dt, compiled=False), \
            one("sample", "torch", dtype=dt)
        ti = t.get("img_min")
        out.append(f"| {dt} | {fmt(c.get('img_min'))} | {fmt(p.get('img_min'))} | {fmt(ti)} | "
                   f"{fmt(c['img_min'] / ti if c.get('img_min') and ti else None, 2, 'x')} | "
                   f"{fmt(p['img_min'] / ti if p.get('img_min') and ti else None, 2, 'x')} | "
                   f"{fmt(c.get('peak_gb'))} | {fmt(t.get('peak_gb'))} |")
    out += ["", "3. Feature extraction, batch 16, float32, images/s", "| model | MLX img/s | torch img/s | MLX/torch |",
            "|---|---|---|---|"]
    for name in ("inception", "clip", "dinov2"):
        m, t = one("features", "mlx", name=name), one("features", "torch", name=name)
        out.append(f"| {name} | {fmt(m.get('img_s'), 1)} | {fmt(t.get('img_s'), 1)} | "
                   f"{fmt(m['img_s'] / t['img_s'] if m.get('img_s') and t.get('img_s') else None, 2, 'x')} |")
    failed = [f"  {r.get('side', r.get('worker'))} {r.get('name', '')}: {r['error'][:200]}"
              for rs in res["workers"].values() for r in rs if "error" in r]
    return out + (["", "errors:"] + failed if failed else [])


def save(res: dict, out: Path, t0: float) -> None:
    res["elapsed_s"] = time.time() - t0
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny models at 64 px (checks the script on a CPU)")
    p.add_argument("--out", default=None, help="JSON file of the figures (default: $OUT/gpu_proxy.json, else ./)")
    p.add_argument("--budget_s", type=float, default=400, help="seconds for the whole run")
    p.add_argument("--mlx_sample_dtypes", nargs="+", default=["float32", "float16"], help="MLX sampling precisions")
    p.add_argument("--parts", nargs="+", default=["train", "sample", "features"], help="which parts to run")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sh = shape(args.tiny)
    if args.worker:
        WORKERS[args.worker](args, sh, args.deadline)
        return
    out = Path(args.out or Path(os.environ.get("OUT", ".")) / "gpu_proxy.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    res = {"shape": sh, "tiny": args.tiny, "budget_s": args.budget_s, "workers": {}}
    t0 = time.time()
    with open(out.with_suffix(".stderr.txt"), "w") as log:
        for part, name, share in PARTS:
            if part not in args.parts:
                continue
            left = args.budget_s - (time.time() - t0)
            if left < 10:
                res["workers"][name] = [{"worker": name, "skipped": "out of time"}]
                continue
            # Measurements may start until this part's share of the budget is used, then it has 40 s to finish.
            start_by = time.time() + min(share * args.budget_s / 400, left - 10)
            print(f"{name}: up to {start_by - time.time():.0f} s", flush=True)
            rows = res["workers"][name] = []

            def on_row(r, rows=rows):
                rows.append(r)
                show(r)
                save(res, out, t0)

            rows += run_worker(name, args, min(start_by - time.time() + 40, left), start_by, log, on_row)
            save(res, out, t0)
    save(res, out, t0)
    print("\n".join(tables(res)))
    print(f"\nwhole run {res['elapsed_s']:.0f} s; figures in {out}")


if __name__ == "__main__":
    main()
