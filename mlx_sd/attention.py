"""Scaled dot-product attention whose forward and backward never hold the whole score matrix.

At 512 px SD1.5's first and last transformer blocks attend over 64x64 = 4096 tokens, so one
float32 score matrix for batch 2 and 8 heads is 2*8*4096^2*4 bytes = 1.07 GB. The generic
gradient of softmax(QK^T)V keeps about three of those alive at once, which is most of a
training step's peak above the weights (benchmarks/attention_memory.py).

`attention` splits the queries into chunks. Forward: each chunk attends to all keys. Backward
(its own VJP): each chunk recomputes its probabilities and adds its share to dK and dV.
`mx.depends` keeps at most one chunk per stream in flight, so with a memory budget
(mlx_sd.memory; MLX otherwise schedules far ahead) the peak is a few chunk-sized score
buffers instead of three whole ones, at the cost of computing the scores once more in the
backward pass. On the CPU backend the chunks alternate between two streams, i.e. two threads:
MLX runs elementwise work such as softmax's exp on one thread per stream, and this is what
makes the 4096-token attention of a 512 px step ~1.5x faster than one stream.

Below `min_tokens` query tokens (every block except the largest ones, and all of cross
attention's keys) the plain fused `mx.fast.scaled_dot_product_attention` is used.

Both the chunking and the streams were measured on the CPU only: `mlx_sd.device` decides them,
and on a GPU the default is MLX's fused attention (`chunk=None` -> `device.attention_chunk()`);
an explicit chunk still works there, on the default stream.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import lru_cache

import mlx.core as mx

from . import device


@lru_cache(maxsize=None)
def _cpu_streams(n: int) -> tuple:
    return (mx.default_stream(mx.cpu),) + tuple(mx.new_stream(mx.cpu) for _ in range(n - 1))


def chunk_streams() -> tuple:
    """The streams the chunks alternate over: on the CPU backend each stream is its own thread,
    and MLX runs elementwise work (softmax's exp) on one thread per stream, so chunks on 2
    streams take about half the time. On a GPU `(None,)`: the default stream only."""
    n = device.attention_streams()
    return (None,) if device.on_gpu() else _cpu_streams(n)


def resolve_chunk(chunk: int | None) -> int:
    """`None` -> this device's default (`mlx_sd.device.attention_chunk()`); 0 -> never chunk."""
    return device.attention_chunk() if chunk is None else int(chunk)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, chunk: int | None = None,
              min_tokens: int | None = None) -> mx.array:
    """softmax(q k^T * scale) v for `[B, heads, tokens, head_dim]` inputs.

    `chunk` is the number of query rows in flight at once (0 disables chunking, None takes the
    device's default), split between the streams of `chunk_streams()`; chunking is used when
    the query length is at least `min_tokens` (default `2 * chunk`).
    """
    chunk = resolve_chunk(chunk)
    if not is_chunked(q.shape[2], chunk, min_tokens):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    streams = chunk_streams()
    # One chunk in flight per stream: split `chunk` rows between them so the memory stays put.
    return _chunked(float(scale), max(1, chunk // len(streams)), streams)(q, k, v)


def is_chunked(query_tokens: int, chunk: int | None = None, min_tokens: int | None = None) -> bool:
    """Whether `attention` splits a query of this length into chunks."""
    chunk = resolve_chunk(chunk)
    return bool(chunk) and query_tokens >= (min_tokens or 2 * chunk)


def _bounds(L: int, chunk: int):
    return [(i, min(i + chunk, L)) for i in range(0, L, chunk)]


@lru_cache(maxsize=None)
def _chunked(scale: float, chunk: int, streams: tuple):
    n = len(streams)

    @mx.custom_function
    def f(q, k, v):
        outs = []
        for i, (a, b) in enumerate(_bounds(q.shape[2], chunk)):
            with mx.stream(streams[i % n]) if streams[0] is not None else nullcontext():
                qi = q[:, :, a:b]
                if i >= n:  # at most n chunks in flight
                    qi = mx.depends(qi, [outs[i - n]])
                outs.append(mx.fast.scaled_dot_product_attention(qi, k, v, scale=scale))
        return mx.concatenate(outs, axis=2)

    @f.vjp
    def f_vjp(primals, cotangent, output):
        q, k, v = primals
        do = cotangent[0] if isinstance(cotangent, (list, tuple)) else cotangent
        o = output[0] if isinstance(output, (list, tuple)) else output
        kt = k.swapaxes(-1, -2)
        vt = v.swapaxes(-1, -2)
        dqs, dks, dvs = [], [None] * n, [None] * n  # dK and dV summed per stream, then added
        for i, (a, b) in enumerate(_bounds(q.shape[2], chunk)):
            lane = i % n
            with mx.stream(streams[lane]) if streams[0] is not None else nullcontext():
                qi, doi, oi = q[:, :, a:b], do[:, :, a:b], o[:, :, a:b]
                if i >= n:  # at most n chunks in flight
                    qi = mx.depends(qi, [dqs[i - n], dks[lane], dvs[lane]])
                p = mx.softmax((qi * scale) @ kt, axis=-1, precise=True)
                dp = doi @ vt
                delta = mx.sum(doi * oi, axis=-1, keepdims=True)
                ds = p * (dp - delta)
                pv = p.swapaxes(-1, -2) @ doi
                dsk = ds.swapaxes(-1, -2) @ qi
                dvs[lane] = pv if dvs[lane] is None else dvs[lane] + pv
                dks[lane] = dsk if dks[lane] is None else dks[lane] + dsk
                dqs.append((ds @ k) * scale)
        dk = sum(d for d in dks if d is not None)
        dv = sum(d for d in dvs if d is not None)
        return mx.concatenate(dqs, axis=2), dk * scale, dv

    return f
