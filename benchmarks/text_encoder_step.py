"""What --train_text_encoder adds to a step: CLIP text encoder + LoRA forward and backward, MLX vs
transformers + PEFT, side by side (SD1.5 text-encoder shape, random weights, float32).

Both sides: the real SD1.5 text-encoder config (12 layers, 768 wide, 77 tokens), LoRA r=8 alpha=16
on q/k/v/out_proj, a batch of token ids, the gradient of the mean square of the embeddings with
respect to the LoRA weights only. MLX runs it compiled (as the train step does); torch in eager
mode, as a PEFT training script does. Reported: trainable parameters on each side, median s/iter
over the timed iterations after warm-up, the ratio MLX/torch, and MLX's allocator peak.

    python benchmarks/text_encoder_step.py --batch 2 --iters 10
"""

from __future__ import annotations

import mlx_sd  # noqa: F401, I001  (first: the fast BLAS under MLX on Linux)

import argparse
import statistics
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from lora import LoRAConfig, inject_lora, text_encoder_predicate, trainable_count
from mlx_sd import blas
from mlx_sd.clip import CLIPTextModel
from mlx_sd.config import CLIPTextConfig, read_json
from mlx_sd.configs import SD15

TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def timed(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_mlx(ids: np.ndarray, warmup: int, iters: int) -> tuple[int, float, float]:
    mx.random.seed(0)
    model = CLIPTextModel(CLIPTextConfig.from_diffusers(read_json(SD15 / "text_encoder" / "config.json")))
    inject_lora(model, LoRAConfig(r=8, alpha=16), text_encoder_predicate(TARGETS))
    for _, layer in model.named_modules():  # non-zero B: the backward pass does its full work
        if hasattr(layer, "lora_B"):
            layer.lora_B.weight = mx.random.normal(layer.lora_B.weight.shape) * 0.01
    mx.eval(model.parameters())
    x = mx.array(ids)
    value_and_grad = nn.value_and_grad(model, lambda m, t: mx.mean(mx.square(m(t))))
    grad = mx.compile(lambda t: value_and_grad(model, t), inputs=model.state, outputs=model.state)

    def step():
        loss, g = grad(x)
        mx.eval(loss, g)

    mx.reset_peak_memory()
    s = timed(step, warmup, iters)
    return trainable_count(model), s, mx.get_peak_memory() / 1e9


def run_torch(ids: np.ndarray, warmup: int, iters: int) -> tuple[int, float]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPTextConfig as TorchConfig
    from transformers import CLIPTextModel as TorchCLIP

    torch.manual_seed(0)
    model = get_peft_model(TorchCLIP(TorchConfig(**read_json(SD15 / "text_encoder" / "config.json"))),
                           LoraConfig(r=8, lora_alpha=16, target_modules=list(TARGETS), init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)
    x = torch.from_numpy(ids.astype(np.int64))
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        model(x).last_hidden_state.square().mean().backward()

    return sum(p.numel() for p in params), timed(step, warmup, iters)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no_torch", action="store_true", help="MLX only")
    args = ap.parse_args(argv)
    ids = np.random.default_rng(0).integers(0, 49406, (args.batch, 77)).astype(np.int32)
    print(f"BLAS: {blas.status().describe()}; device: {mx.default_device()}")
    n_mlx, s_mlx, peak = run_mlx(ids, args.warmup, args.iters)
    total = sum(v.size for _, v in tree_flatten(CLIPTextModel(CLIPTextConfig.from_diffusers(
        read_json(SD15 / "text_encoder" / "config.json"))).parameters()))
    print(f"SD1.5 text encoder ({total:,} parameters), LoRA r=8 on {' '.join(TARGETS)}, batch {args.batch} x 77 tokens")
    print(f"MLX:   {n_mlx:,} trainable, {s_mlx:.3f} s/iter (forward + backward, compiled), peak {peak:.2f} GB")
    if not args.no_torch:
        n_torch, s_torch = run_torch(ids, args.warmup, args.iters)
        print(f"torch: {n_torch:,} trainable (PEFT), {s_torch:.3f} s/iter (forward + backward, eager)")
        print(f"MLX / torch time: {s_mlx / s_torch:.2f}")


if __name__ == "__main__":
    main()
