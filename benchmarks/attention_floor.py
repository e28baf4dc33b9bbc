"""How much of a training step the self-attention's softmax alone costs, MLX vs torch.

Every self-attention must exponentiate each of its B x heads x tokens^2 scores once in the
forward pass and once more in the backward pass (the chunked attention recomputes its
probabilities instead of keeping a tokens^2 matrix, as flash-style fused kernels do).
This prints, at one resolution and batch: exp throughput, the softmax over one self-attention's
scores (one and two CPU streams, as `mlx_sd.attention` runs it), the whole attention forward and
forward+backward, and the sum over SD1.5's self-attentions of 2 x softmax: a lower bound on the
MLX step that no change to the product's code removes (torch's equivalent printed beside it).

    python benchmarks/attention_floor.py --resolution 512 --batch 1
"""

import mlx_sd  # noqa: F401,I001  (first: puts the fast BLAS under MLX before mlx.core loads)

import argparse
from contextlib import nullcontext

import mlx.core as mx
import numpy as np
import torch

from mlx_sd.attention import attention, chunk_streams
from mlx_sd.blas import status as blas_status
from mlx_sd.config import UNetConfig, read_json
from mlx_sd.configs import SD15
from models import median_seconds  # benchmarks/models.py (this folder is on sys.path)


def self_attention_blocks(config: UNetConfig, latent: int) -> list[tuple[int, int, int, int]]:
    """(tokens, heads, head_dim, count) of the UNet's self-attentions: levels with cross-attention blocks
    hold layers_per_block down + (layers_per_block + 1) up transformers; the mid block one."""
    out = []
    n = len(config.block_out_channels)
    for i, kind in enumerate(config.down_block_types):
        if kind == "CrossAttnDownBlock2D":
            count = config.layers_per_block[i] * config.transformer_layers_per_block[i]
            count += (config.layers_per_block[i] + 1) * config.transformer_layers_per_block[i]
            heads = config.num_attention_heads[i]
            out.append(((latent >> i) ** 2, heads, config.block_out_channels[i] // heads, count))
    heads = config.num_attention_heads[-1]
    out.append(((latent >> (n - 1)) ** 2, heads, config.block_out_channels[-1] // heads,
                config.transformer_layers_per_block[-1]))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(2)
    config = UNetConfig.from_diffusers(read_json(SD15 / "unet" / "config.json"))
    latent = args.resolution // 8
    B, r = args.batch, args.repeats
    streams = chunk_streams()
    print(f"MLX {mx.__version__} {mx.default_device()}, {blas_status().describe()}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.resolution} px, batch {B}; {len(streams)} MLX stream(s)\n")

    n = 1 << 25
    xm = mx.random.normal((n,))
    xt = torch.from_numpy(np.array(xm))
    mx.eval(xm)
    em = median_seconds(lambda: mx.eval(mx.exp(xm)), r)
    et = median_seconds(lambda: torch.exp(xt), r)
    print(f"exp over {n} float32: MLX {n / em / 1e9:.3f} Gelem/s (one stream), torch {n / et / 1e9:.3f} Gelem/s\n")

    print(f"{'self-attention':28s} {'softmax 1 stream':>16s} {'softmax streams':>16s} {'torch softmax':>14s} "
          f"{'MLX fwd+bwd':>12s} {'torch fwd+bwd':>14s}")
    floor_m = floor_t = total_m = total_t = 0.0
    for tokens, heads, d, count in self_attention_blocks(config, latent):
        rng = np.random.default_rng(0)
        q = rng.standard_normal((B, heads, tokens, d)).astype(np.float32)
        qm, qt = mx.array(q), torch.from_numpy(q)
        s = (qm * d**-0.5) @ qm.swapaxes(-1, -2)
        st = torch.from_numpy(np.array(s))
        mx.eval(s)
        one = median_seconds(lambda: mx.eval(mx.softmax(s, axis=-1, precise=True)), r)

        def split():
            parts, step = [], -(-tokens // len(streams))
            for i, lane in enumerate(streams):
                with mx.stream(lane) if lane is not None else nullcontext():
                    parts.append(mx.softmax(s[:, :, i * step:(i + 1) * step], axis=-1, precise=True))
            mx.eval(*parts)
        many = median_seconds(split, r)
        tsm = median_seconds(lambda: torch.softmax(st, dim=-1), r)
        s = st = None  # free the scores before the attention runs
        g = mx.compile(mx.grad(lambda q: mx.sum(attention(q, q, q, d**-0.5)), argnums=0))
        fb = median_seconds(lambda: mx.eval(g(qm)), r)
        qg = qt.clone().requires_grad_(True)

        def tfb():
            qg.grad = None
            torch.nn.functional.scaled_dot_product_attention(qg, qg, qg).sum().backward()
        tfbs = median_seconds(tfb, r)
        print(f"{count} x {tokens:5d} tokens, {heads} heads  "
              f"{one:16.3f} {many:16.3f} {tsm:14.3f} {fb:12.3f} {tfbs:14.3f}")
        floor_m += count * 2 * min(one, many)
        floor_t += count * 2 * tsm
        total_m += count * fb
        total_t += count * tfbs
    print(f"\nper step, all self-attentions (s): 2 x softmax MLX {floor_m:.2f} vs torch {floor_t:.2f}; "
          f"attention fwd+bwd MLX {total_m:.2f} vs torch {total_t:.2f}")


if __name__ == "__main__":
    main()
