"""Query-chunked attention (mlx_sd.attention) vs torch's scaled_dot_product_attention.

Outputs and the gradients of q, k and v must match torch autograd within 1e-5
(max error relative to the largest reference value, `fixtures.rel_err`)
(float32 on the CPU; measured ~3e-7), with a chunk size that does not divide the query length,
for self- and cross-attention, under mx.compile and inside a gradient checkpoint. The backward
pass must hold less than half of what the fused attention's backward holds.
"""

import mlx_sd  # noqa: F401  (before mlx.core: installs the fast BLAS)

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_sd.attention import attention
from mlx_sd.unet import UNet2DConditionModel
from fixtures import rel_err

TOL = 1e-5




def torch_reference(q, k, v, w, scale):
    tq, tk, tv = (torch.tensor(np.array(x), requires_grad=True) for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, scale=scale)
    (out * torch.tensor(np.array(w))).sum().backward()
    return out.detach().numpy(), tq.grad.numpy(), tk.grad.numpy(), tv.grad.numpy()


@pytest.mark.parametrize("keys", [100, 77], ids=["self", "cross"])
@pytest.mark.parametrize("wrap", ["eager", "compiled", "checkpointed"])
def test_chunked_attention_matches_torch(keys, wrap):
    B, H, L, D = 2, 3, 100, 8
    scale = D**-0.5
    r = mx.random.split(mx.random.key(0), 4)
    q = mx.random.normal((B, H, L, D), key=r[0])
    k = mx.random.normal((B, H, keys, D), key=r[1]) * 2  # sharper softmax
    v = mx.random.normal((B, H, keys, D), key=r[2])
    w = mx.random.normal((B, H, L, D), key=r[3])

    def f(q, k, v):
        return attention(q, k, v, scale, chunk=32, min_tokens=1)  # 100 rows: pieces that do not divide it

    g = {"eager": f, "compiled": mx.compile(f), "checkpointed": mx.checkpoint(f)}[wrap]
    loss = lambda q, k, v: mx.sum(g(q, k, v) * w)  # noqa: E731
    out = g(q, k, v)
    grads = mx.grad(loss, argnums=(0, 1, 2))(q, k, v)
    ref = torch_reference(q, k, v, w, scale)
    errs = [rel_err(a, b) for a, b in zip((out, *grads), ref)]
    print(f"chunked attention ({wrap}, {keys} keys) vs torch: out/dq/dk/dv rel "
          + " ".join(f"{e:.1e}" for e in errs))
    assert max(errs) <= TOL, errs


def test_short_sequences_use_the_fused_kernel_unchanged():
    q, k, v = (mx.random.normal((1, 2, 40, 8), key=mx.random.key(i)) for i in range(3))
    a = attention(q, k, v, 0.3, chunk=32)  # 40 < 2 * 32: not chunked
    assert mx.array_equal(a, mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3))


def test_backward_peak_is_a_fraction_of_the_fused_one():
    B, H, L, D = 1, 8, 1024, 16  # one score matrix: 8 x 1024^2 x 4 bytes = 33.5 MB
    q, k, v, w = (mx.random.normal((B, H, L, D), key=mx.random.key(i)) for i in range(4))
    mx.eval(q, k, v, w)
    peaks = {}
    # MLX's CPU and GPU backends run ahead of the graph; with a memory limit below the working
    # set the scheduler waits for finished work before starting more, which is what train.py
    # relies on (mlx_sd.memory) and what makes chunking pay off.
    old = mx.set_memory_limit(1)
    try:
        for chunk in (0, 128):
            grad = mx.grad(lambda q, k, v, chunk=chunk: mx.sum(attention(q, k, v, 0.25, chunk) * w),
                           argnums=(0, 1, 2))
            base = mx.get_active_memory()
            mx.reset_peak_memory()
            mx.eval(grad(q, k, v))
            peaks[chunk] = mx.get_peak_memory() - base
    finally:
        mx.set_memory_limit(old)
    print(f"attention backward peak: fused {peaks[0] / 1e6:.1f} MB, 128-row chunks {peaks[128] / 1e6:.1f} MB")
    assert peaks[0] > 2 * 33.5e6  # the fused backward holds at least two score matrices...
    assert peaks[128] < 0.5 * peaks[0]  # ...chunks hold a few eighths of one


def test_unet_with_chunked_attention_same_output_and_grads(tiny_pair):
    torch_unet, unet = tiny_pair
    from test_unet import compare, mlx_twin

    chunked = mlx_twin(torch_unet)
    chunked.attention_chunk = 48  # 16x24 latent = 384 tokens in the first block: 8 pieces
    assert chunked.attention_chunk == 48
    err = compare(torch_unet, chunked, batch=2, size=(16, 24), timesteps=[10, 900])
    assert err <= 1e-4

    x = mx.random.normal((2, 16, 24, 4), key=mx.random.key(1))
    ctx = mx.random.normal((2, 77, 32), key=mx.random.key(2))

    def grad_of(model):
        return mx.grad(lambda x: (model(x, mx.array([10, 900]), ctx) ** 2).mean())(x)

    assert rel_err(grad_of(chunked), grad_of(unet)) <= 1e-5


@pytest.fixture(scope="module")
def tiny_pair(tiny_diffusers_dir):
    from diffusers import UNet2DConditionModel as TorchUNet

    from test_unet import mlx_twin

    torch_unet = TorchUNet.from_pretrained(tiny_diffusers_dir / "unet").eval()
    unet = mlx_twin(torch_unet)
    unet.attention_chunk = 0
    assert isinstance(unet, UNet2DConditionModel)
    return torch_unet, unet
