"""Scaled dot-product attention whose forward and backward never hold the whole score matrix.

At 512 px SD1.5's first and last transformer blocks attend over 64x64 = 4096 tokens, so one
float32 score matrix for batch 2 and 8 heads is 2*8*4096^2*4 bytes = 1.07 GB. The generic
gradient of softmax(QK^T)V keeps about three of those alive at once, which is most of a
training step's peak above the weights (benchmarks/attention_memory.py).

`attention` splits the queries into chunks. Forward: each chunk attends to all keys and
its scores are freed before the next chunk starts. Backward (its own VJP): each chunk
recomputes its probabilities and adds its share to dK and dV; `mx.depends` orders the chunks
so that one chunk's scores are gone before the next chunk's are made. The peak is then a few
chunk-sized score buffers instead of three whole ones, at the cost of computing the scores
once more in the backward pass (which gradient checkpointing recomputes anyway).

Below `min_tokens` query tokens (every block except the largest ones, and all of cross
attention's keys) the plain fused `mx.fast.scaled_dot_product_attention` is used.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx

DEFAULT_CHUNK = 1024


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, chunk: int = DEFAULT_CHUNK,
              min_tokens: int | None = None) -> mx.array:
    """softmax(q k^T * scale) v for `[B, heads, tokens, head_dim]` inputs.

    `chunk` is the number of query rows per piece (0 disables chunking); chunking is used
    when the query length is at least `min_tokens` (default `2 * chunk`).
    """
    L = q.shape[2]
    if not chunk or L < (min_tokens or 2 * chunk):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    return _chunked(float(scale), int(chunk))(q, k, v)


def _bounds(L: int, chunk: int):
    return [(i, min(i + chunk, L)) for i in range(0, L, chunk)]


@lru_cache(maxsize=None)
def _chunked(scale: float, chunk: int):
    @mx.custom_function
    def f(q, k, v):
        outs = []
        after = []
        for a, b in _bounds(q.shape[2], chunk):
            qi = q[:, :, a:b]
            if after:
                qi = mx.depends(qi, after)
            o = mx.fast.scaled_dot_product_attention(qi, k, v, scale=scale)
            outs.append(o)
            after = [o]
        return mx.concatenate(outs, axis=2)

    @f.vjp
    def f_vjp(primals, cotangent, output):
        q, k, v = primals
        do = cotangent[0] if isinstance(cotangent, (list, tuple)) else cotangent
        o = output[0] if isinstance(output, (list, tuple)) else output
        kt = k.swapaxes(-1, -2)
        vt = v.swapaxes(-1, -2)
        dqs = []
        dk = dv = None
        for a, b in _bounds(q.shape[2], chunk):
            qi, doi, oi = q[:, :, a:b], do[:, :, a:b], o[:, :, a:b]
            if dk is not None:
                qi = mx.depends(qi, [dqs[-1], dk, dv])
            p = mx.softmax((qi * scale) @ kt, axis=-1, precise=True)
            dp = doi @ vt
            delta = mx.sum(doi * oi, axis=-1, keepdims=True)
            ds = p * (dp - delta)
            pv = p.swapaxes(-1, -2) @ doi
            dsk = ds.swapaxes(-1, -2) @ qi
            dv = pv if dv is None else dv + pv
            dk = dsk if dk is None else dk + dsk
            dqs.append((ds @ k) * scale)
        return mx.concatenate(dqs, axis=2), dk * scale, dv

    return f
