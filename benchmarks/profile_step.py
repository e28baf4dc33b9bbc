"""Where a training step's time goes: MLX vs torch by op class and by UNet block, forward+backward.

Op classes are timed in isolation at the shapes of SD1.5's first (largest) level: the latent
grid is resolution/8 square with 320 channels, self-attention over all its tokens with 8 heads
of 40, cross-attention to 77 text tokens. Each is a compiled value_and_grad of a sum (MLX) or a
forward + backward (torch), w.r.t. the input, so the backward through the op is included.
Blocks are the real SD1.5 UNet's down/mid/up blocks (random weights, LoRA r=8 on the attention
projections, gradients w.r.t. the LoRA parameters and the block input), fed with the
activations a forward pass gives them. Medians of `--repeats` after a warm-up; ratio = MLX/torch.

    python benchmarks/profile_step.py --resolution 256 --batch 1
"""

import mlx_sd  # noqa: F401,I001  (first: puts the fast BLAS under MLX before mlx.core loads)

import argparse
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import torch

from convert.layout import diffusers_to_mlx
from lora import LoRAConfig, inject_lora
from mlx_sd.blas import status as blas_status
from mlx_sd.config import UNetConfig, read_json
from mlx_sd.configs import SD15
from mlx_sd.unet import UNet2DConditionModel
from mlx_sd.weights import load_strict
from models import median_seconds  # benchmarks/models.py (this folder is on sys.path)


def mlx_fwd_bwd(f, *inputs):
    g = mx.compile(mx.value_and_grad(lambda *a: mx.sum(f(*a)), argnums=tuple(range(len(inputs)))))
    return lambda: mx.eval(g(*inputs))


def torch_fwd_bwd(f, *inputs):
    ts = [t.detach().clone().requires_grad_(True) for t in inputs]

    def run():
        for t in ts:
            t.grad = None
        f(*ts).sum().backward()
    return run


def op_classes(res: int, batch: int, repeats: int):
    n = res // 8
    L, C, H = n * n, 320, 8
    rng = np.random.default_rng(0)

    def arr(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    x_img, x_tok = arr(batch, n, n, C), arr(batch, L, C)
    conv_m, conv_t = nn.Conv2d(C, C, 3, padding=1), torch.nn.Conv2d(C, C, 3, padding=1).requires_grad_(False)
    gn_m, gn_t = nn.GroupNorm(32, C, pytorch_compatible=True), torch.nn.GroupNorm(32, C)
    ln_m, ln_t = nn.LayerNorm(C), torch.nn.LayerNorm(C)
    lin_m, lin_t = nn.Linear(C, C), torch.nn.Linear(C, C).requires_grad_(False)
    ff_m, ff_t = nn.Linear(C, 8 * C), torch.nn.Linear(C, 8 * C).requires_grad_(False)
    q_m = mx.array(arr(batch, H, L, C // H))
    k_m, v_m = mx.array(arr(batch, H, 77, C // H)), mx.array(arr(batch, H, 77, C // H))
    q_t, k_t, v_t = (torch.from_numpy(np.array(a)) for a in (q_m, k_m, v_m))
    from mlx_sd.attention import attention

    def geglu_m(x):
        h, gate = mx.split(ff_m(x), 2, axis=-1)
        return h * nn.gelu(gate)

    def geglu_t(x):
        h, gate = ff_t(x).chunk(2, dim=-1)
        return h * torch.nn.functional.gelu(gate)

    xi, xt = mx.array(x_img), mx.array(x_tok)
    ti, tt = torch.from_numpy(x_img).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(x_tok)
    cases = [
        ("conv 3x3", lambda x: conv_m(x), (xi,), lambda x: conv_t(x), (ti,)),
        ("GroupNorm + SiLU", lambda x: nn.silu(gn_m(x)), (xi,), lambda x: torch.nn.functional.silu(gn_t(x)), (ti,)),
        ("LayerNorm", lambda x: ln_m(x), (xt,), lambda x: ln_t(x), (tt,)),
        ("Linear 320->320", lambda x: lin_m(x), (xt,), lambda x: lin_t(x), (tt,)),
        ("GEGLU 320->2x1280", geglu_m, (xt,), geglu_t, (tt,)),
        (f"self-attention {L} tokens", lambda q: attention(q, q, q, (C // H) ** -0.5), (q_m,),
         lambda q: torch.nn.functional.scaled_dot_product_attention(q, q, q), (q_t,)),
        ("cross-attention 77 keys", lambda q: attention(q, k_m, v_m, (C // H) ** -0.5), (q_m,),
         lambda q: torch.nn.functional.scaled_dot_product_attention(q, k_t, v_t), (q_t,)),
        ("SiLU (elementwise)", nn.silu, (xi,), torch.nn.functional.silu, (ti,)),
    ]
    rows = []
    for name, fm, im, ft, it in cases:
        m = median_seconds(mlx_fwd_bwd(fm, *im), repeats)
        t = median_seconds(torch_fwd_bwd(ft, *it), repeats)
        rows.append((name, m, t))
    return rows


def blocks(res: int, batch: int, repeats: int):
    from diffusers import UNet2DConditionModel as TorchUNet
    from peft import LoraConfig

    cfg = read_json(SD15 / "unet" / "config.json")
    torch.manual_seed(0)
    tu = TorchUNet.from_config(cfg).requires_grad_(False)
    unet = load_strict(UNet2DConditionModel(UNetConfig.from_diffusers(cfg)),
                       diffusers_to_mlx("unet", {k: mx.array(v.numpy()) for k, v in tu.state_dict().items()}))
    tu.add_adapter(LoraConfig(r=8, lora_alpha=16, init_lora_weights="gaussian",
                              target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    inject_lora(unet, LoRAConfig(r=8, alpha=16))
    tu.train()
    n = res // 8
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, n, n, 4)).astype(np.float32)
    ctx = rng.standard_normal((batch, 77, 768)).astype(np.float32)
    t = np.array([500] * batch)

    # Capture each block's inputs from one forward pass of the MLX UNet.
    xm, cm = mx.array(x), mx.array(ctx)
    from mlx_sd.unet import timestep_embedding
    temb = unet.time_embedding(timestep_embedding(mx.array(t), 320, True, 0))
    h = unet.conv_in(xm)
    skips = [h]
    inputs = []
    for i, b in enumerate(unet.down_blocks):
        inputs.append((f"down {i}", b, (h, temb, cm), tu.down_blocks[i]))
        h, s = b(h, temb, cm)
        skips.extend(s)
    inputs.append(("mid", unet.mid_block, (h, temb, cm), tu.mid_block))
    h = unet.mid_block(h, temb, cm)
    for i, b in enumerate(unet.up_blocks):
        k = len(b.resnets)
        sk = skips[-k:]
        skips = skips[:-k]
        inputs.append((f"up {i}", b, (h, temb, list(sk), cm), tu.up_blocks[i]))
        h = b(h, temb, list(sk), cm)
    mx.eval(h, [a for _, _, a, _ in inputs])

    rows = []
    for name, block, args, tblock in inputs:
        def loss(params, inp, block=block, args=args):
            block.update(params)
            out = block(inp, *[list(a) if isinstance(a, list) else a for a in args[1:]])  # up blocks pop skips
            return mx.sum(out[0] if isinstance(out, tuple) else out)
        params = block.trainable_parameters()
        g = mx.compile(mx.value_and_grad(loss, argnums=(0, 1)))
        m = median_seconds(lambda g=g, params=params, args=args: mx.eval(g(params, args[0])), repeats)
        nchw = lambda a: torch.from_numpy(np.array(a)).permute(0, 3, 1, 2).contiguous()  # noqa: E731
        th = nchw(args[0]).requires_grad_(True)
        tt = torch.from_numpy(np.array(args[1]))
        tc = torch.from_numpy(ctx)
        if name.startswith("down"):
            call = (lambda tb=tblock: tb(th, tt, encoder_hidden_states=tc)[0]) if hasattr(tblock, "attentions") \
                else (lambda tb=tblock: tb(th, tt)[0])
        elif name == "mid":
            call = lambda tb=tblock: tb(th, tt, encoder_hidden_states=tc)  # noqa: E731
        else:
            sk = tuple(nchw(s) for s in args[2])
            call = (lambda tb=tblock, sk=sk: tb(th, sk, tt, encoder_hidden_states=tc)) if hasattr(tblock, "attentions") \
                else (lambda tb=tblock, sk=sk: tb(th, sk, tt))

        def trun(call=call):
            th.grad = None
            for p in tblock.parameters():
                p.grad = None
            call().sum().backward()
        tm = median_seconds(trun, repeats)
        rows.append((name, m, tm))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=256, help="image size in px (latent = size/8)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip_blocks", action="store_true", help="op classes only")
    args = p.parse_args()
    torch.set_grad_enabled(True)
    print(f"MLX {mx.__version__} {mx.default_device()}, {blas_status().describe()}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.resolution} px, batch {args.batch}, forward+backward")
    sections = [("op class (first level shapes)", op_classes)] + ([] if args.skip_blocks else [("UNet block", blocks)])
    results = {}
    for title, fn in sections:
        rows = fn(args.resolution, args.batch, args.repeats)
        results[title] = rows
        total_m = sum(r[1] for r in rows)
        print(f"\n{title:<34}{'MLX ms':>10}{'torch ms':>10}{'ratio':>8}{'MLX share':>11}")
        for name, m, t in rows:
            print(f"{name:<34}{m * 1e3:>10.1f}{t * 1e3:>10.1f}{m / t:>7.2f}x{100 * m / total_m:>10.0f}%")
        print(f"{'sum':<34}{total_m * 1e3:>10.1f}{sum(r[2] for r in rows) * 1e3:>10.1f}"
              f"{total_m / sum(r[2] for r in rows):>7.2f}x")
    print(json.dumps({k: [[n, round(m, 4), round(t, 4)] for n, m, t in v] for k, v in results.items()}))


if __name__ == "__main__":
    main()
