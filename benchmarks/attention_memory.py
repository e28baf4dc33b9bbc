"""Backward-pass memory of one 4096-token self-attention (SD1.5 at 512 px, 8 heads, batch 2).

Prints MLX's peak allocation above the inputs for the gradient of q, k and v, with the fused
`mx.fast.scaled_dot_product_attention` and a plain softmax(QK^T)V, whole or in query chunks
each wrapped in `mx.checkpoint`. One score matrix is 2 x 8 x 4096^2 float32 = 1.07 GB; this is
the transient that dominates the 512 px training step's peak above the weights.

    python benchmarks/attention_memory.py [--tokens 4096] [--batch 2] [--chunk 1024]
"""

import mlx_sd  # noqa: F401  (first: fast BLAS under MLX on Linux)

import argparse

import mlx.core as mx


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="query/key tokens (64x64 latent at 512 px)")
    p.add_argument("--batch", type=int, default=2, help="batch size")
    p.add_argument("--heads", type=int, default=8, help="attention heads")
    p.add_argument("--head_dim", type=int, default=40, help="channels per head (320 / 8 in SD1.5's first block)")
    p.add_argument("--chunk", type=int, default=1024, help="query rows per checkpointed chunk")
    args = p.parse_args()
    B, H, L, D = args.batch, args.heads, args.tokens, args.head_dim
    scale = D ** -0.5

    def fused(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)

    def plain(q, k, v):
        return mx.softmax((q * scale) @ k.transpose(0, 1, 3, 2), axis=-1) @ v

    q, k, v = (mx.random.normal((B, H, L, D)) for _ in range(3))
    mx.eval(q, k, v)
    print(f"one score matrix: {B * H * L * L * 4 / 1e9:.2f} GB (float32)")
    for name, f in (("fused sdpa", fused), ("softmax(QK^T)V", plain)):
        for chunk in (0, args.chunk):
            def loss(q, k, v, f=f, chunk=chunk):
                if chunk:
                    g = mx.checkpoint(f)
                    o = mx.concatenate([g(q[:, :, i:i + chunk], k, v) for i in range(0, L, chunk)], axis=2)
                else:
                    o = f(q, k, v)
                return mx.sum(o * o)

            grads = mx.grad(loss, argnums=(0, 1, 2))
            base = mx.get_active_memory()
            mx.reset_peak_memory()
            mx.eval(grads(q, k, v))
            label = f"{name}, {'whole' if not chunk else f'{chunk}-query checkpointed chunks'}"
            print(f"{label:<48} backward peak above inputs {(mx.get_peak_memory() - base) / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
