"""A 3x3 convolution whose input gradient is nine matmuls.

MLX's own gradient of `conv2d` w.r.t. its input is slow where the feature map is small and the
channels are many (SD1.5's lower UNet levels): on the CPU backend, 2x4x4x1280 takes ~180 ms
against ~9 ms for the forward. Writing that gradient as the sum over the nine kernel taps of a
shifted output-gradient times the tap's `[out, in]` weight slice gives the same numbers (float32
summation order aside) in ~32 ms. Where the map is large MLX's path is as fast or faster, so the
rule below keeps it there (`python benchmarks/profile_step.py` shows both per block).

The stride-2 gradient is worse still (2x64x64x320: ~3.2 s against ~23 ms forward); there the
taps are collected per parity of the input position and interleaved: 25-90x faster at
SD1.5's downsampling shapes (55 ms there).

`Conv2d` is `nn.Conv2d` (same parameters, same keys) that takes these paths for padding-1 3x3
convolutions: stride 1 with fewer pixels than 4x its input channels, and stride 2. All of this
was measured on the CPU backend only: on a GPU (`mlx_sd.device.custom_conv_gradients()`) it is
plain `nn.Conv2d`, MLX's own gradients.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import device


def _shifted_taps(x: mx.array, stride: int = 1):
    """The nine 3x3 neighbourhood views (padding 1) of an NHWC map at `stride`, in (row, column)
    order: view (a, c) holds the input each output position sees through kernel tap (a, c)."""
    _, H, W, _ = x.shape
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    xp = mx.pad(x, [(0, 0), (1, stride), (1, stride), (0, 0)])
    return [xp[:, a:a + stride * Ho:stride, c:c + stride * Wo:stride, :] for a in range(3) for c in range(3)]


def _weight_grad(x: mx.array, dy: mx.array, weight: mx.array, stride: int) -> mx.array:
    """dL/dW of a padding-1 3x3 convolution: the output gradient against the nine tap views.
    Only evaluated when the weight is trained (never for the frozen base under LoRA)."""
    cols = mx.concatenate(_shifted_taps(x, stride), axis=-1).reshape(-1, 9 * x.shape[-1])
    return (dy.reshape(-1, weight.shape[0]).T @ cols).reshape(weight.shape)


@mx.custom_function
def conv3x3(x: mx.array, weight: mx.array) -> mx.array:
    """`mx.conv2d(x, weight, padding=1)` for NHWC `x` and OHWI 3x3 `weight`."""
    return mx.conv2d(x, weight, padding=1)


@conv3x3.vjp
def _conv3x3_vjp(primals, cotangent, output):
    x, weight = primals
    dy = cotangent[0] if isinstance(cotangent, (list, tuple)) else cotangent
    dx = None
    # y[p] = sum_{a,c} x[p + (a-1, c-1)] W[:, a, c, :]  =>  dx[q] = sum_{a,c} dy[q - (a-1, c-1)] W[:, a, c, :]
    for k, tap in enumerate(_shifted_taps(dy)):
        a, c = divmod(k, 3)
        term = tap @ weight[:, 2 - a, 2 - c, :]
        dx = term if dx is None else dx + term
    return dx, _weight_grad(x, dy, weight, stride=1)


@mx.custom_function
def conv3x3_stride2(x: mx.array, weight: mx.array) -> mx.array:
    """`mx.conv2d(x, weight, stride=2, padding=1)` for NHWC `x` and OHWI 3x3 `weight`."""
    return mx.conv2d(x, weight, stride=2, padding=1)


@conv3x3_stride2.vjp
def _conv3x3_stride2_vjp(primals, cotangent, output):
    x, weight = primals
    dy = cotangent[0] if isinstance(cotangent, (list, tuple)) else cotangent
    B, H, W, in_ch = x.shape
    _, Ho, Wo, _ = dy.shape
    # y[p] = sum_{a,c} xp[2p + (a, c)] W[:, a, c, :] on the 1-padded input xp, so tap (a, c)
    # sends dy[p] W[:, a, c, :] to xp[2p + (a, c)]. Collect the taps per (row, column) parity
    # of that position on an (Ho+1) x (Wo+1) grid, then interleave the four parity planes.
    planes = [[None, None], [None, None]]
    for a in range(3):
        for c in range(3):
            term = mx.pad(dy @ weight[:, a, c, :], [(0, 0), (a // 2, 1 - a // 2), (c // 2, 1 - c // 2), (0, 0)])
            old = planes[a % 2][c % 2]
            planes[a % 2][c % 2] = term if old is None else old + term
    rows = [mx.stack(planes[r], axis=3) for r in (0, 1)]  # [B, Ho+1, Wo+1, 2, C] per row parity
    dxp = mx.stack(rows, axis=2).reshape(B, 2 * Ho + 2, 2 * Wo + 2, in_ch)
    dx = dxp[:, 1:1 + H, 1:1 + W, :]
    return dx, _weight_grad(x, dy, weight, stride=2)


class Conv2d(nn.Conv2d):
    def __call__(self, x):
        if not device.custom_conv_gradients():
            return super().__call__(x)
        w = self.weight
        plain = (w.shape[1:3] == (3, 3) and self.padding == (1, 1) and self.dilation in (1, (1, 1))
                 and getattr(self, "groups", 1) == 1)
        if plain and self.stride == (1, 1) and x.shape[1] * x.shape[2] < 4 * w.shape[-1]:
            y = conv3x3(x, w)
        elif plain and self.stride == (2, 2):
            y = conv3x3_stride2(x, w)
        else:
            return super().__call__(x)
        return y + self.bias if "bias" in self else y
