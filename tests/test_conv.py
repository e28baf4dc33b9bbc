"""The 3x3 convolution with its own input gradient (mlx_sd.conv) vs torch's conv2d autograd.

Output and the gradients w.r.t. input and weight must match torch within 1e-5
(max error relative to the largest reference value, `fixtures.rel_err`)
(float32; measured ~3e-7) on shapes that take the custom paths (stride 1 and 2, even and odd
sizes) and shapes that do not.
"""

import mlx_sd  # noqa: F401  (before mlx.core: installs the fast BLAS)

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_sd.conv import Conv2d
from fixtures import rel_err




@pytest.mark.parametrize("shape,stride", [((2, 4, 6, 96), 1), ((1, 3, 3, 40), 1), ((2, 16, 16, 8), 1),
                                          ((2, 8, 6, 16), 2), ((1, 7, 5, 12), 2)],
                         ids=["custom", "custom-odd", "mlx", "stride2", "stride2-odd"])
def test_conv3x3_matches_torch(shape, stride):
    B, H, W, C = shape
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    conv = Conv2d(C, 24, 3, stride=stride, padding=1)
    r = mx.random.split(mx.random.key(0), 2)
    x = mx.random.normal(shape, key=r[0])
    w = mx.random.normal((B, Ho, Wo, 24), key=r[1])  # loss weights

    def loss(params, x):
        conv.update(params)
        return mx.sum(conv(x) * w)

    out = conv(x)
    gp, gx = mx.grad(loss, argnums=(0, 1))(conv.trainable_parameters(), x)

    tconv = torch.nn.Conv2d(C, 24, 3, stride=stride, padding=1)
    with torch.no_grad():
        tconv.weight.copy_(torch.from_numpy(np.array(conv.weight).transpose(0, 3, 1, 2)))
        tconv.bias.copy_(torch.from_numpy(np.array(conv.bias)))
    tx = torch.from_numpy(np.array(x).transpose(0, 3, 1, 2)).requires_grad_(True)
    tout = tconv(tx)
    (tout * torch.from_numpy(np.array(w).transpose(0, 3, 1, 2))).sum().backward()

    errs = {
        "out": rel_err(out, tout.detach().numpy().transpose(0, 2, 3, 1)),
        "dx": rel_err(gx, tx.grad.numpy().transpose(0, 2, 3, 1)),
        "dw": rel_err(gp["weight"], tconv.weight.grad.numpy().transpose(0, 2, 3, 1)),
        "db": rel_err(gp["bias"], tconv.bias.grad.numpy()),
    }
    assert out.shape == (B, Ho, Wo, 24)
    print(f"conv3x3 {shape} stride {stride}: " + " ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    assert max(errs.values()) <= 1e-5, errs


def test_custom_path_is_taken_only_for_small_maps(monkeypatch, cpu_branches):
    import mlx_sd.conv as conv_mod

    calls = []
    real = conv_mod.conv3x3
    monkeypatch.setattr(conv_mod, "conv3x3", lambda x, w: calls.append(x.shape) or real(x, w))
    conv = Conv2d(64, 64, 3, padding=1)
    conv(mx.zeros((1, 8, 8, 64)))  # 64 pixels < 4 x 64 channels: custom
    conv(mx.zeros((1, 32, 32, 64)))  # 1024 pixels: MLX's own
    Conv2d(64, 64, 3, padding=0)(mx.zeros((1, 8, 8, 64)))  # another padding: MLX's own
    assert calls == [(1, 8, 8, 64)]
