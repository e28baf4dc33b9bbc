"""InceptionV3 as pytorch-fid defines it for FID, in MLX.

The network is torchvision's Inception3 with pytorch-fid's FID blocks: the average pools inside
Mixed_5*/6*/7b ignore the zero padding (TensorFlow's `count_include_pad=False`), and Mixed_7c
max-pools where the paper average-pools. Only the layers up to the 2048-d pool3 output exist;
the converted weights carry no `fc` (1008 classes), which FID never uses.

Layout: images in NHWC float32 in [0, 1] (any size); `features` resizes them to 299x299 with
bilinear interpolation (align_corners=False, no antialiasing, as `torch.nn.functional.interpolate`
does in pytorch-fid), scales to [-1, 1] and returns [B, 2048] float32. Parameter paths equal the
torch state-dict keys (`Mixed_6b.branch7x7_2.conv.weight`, `...bn.running_var`).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..weights import load_strict
from .images import resize_matrix

SIZE = 299
POOL3_DIM = 2048


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm(cout, eps=1e-3)

    def __call__(self, x):
        return nn.relu(self.bn(self.conv(x)))


def _edge_counts(n: int) -> np.ndarray:
    c = np.full(n, 3.0, np.float32)
    c[0] -= 1
    c[-1] -= 1
    return c


def avg_pool_3x3_exclude_pad(x: mx.array) -> mx.array:
    """3x3 stride-1 average pool whose border windows divide by the pixels they cover."""
    _, h, w, _ = x.shape
    total = nn.AvgPool2d(3, 1, padding=1)(x) * 9.0
    count = mx.array(np.outer(_edge_counts(h), _edge_counts(w))[None, :, :, None])
    return total / count


class FIDInceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def __call__(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(avg_pool_3x3_exclude_pad(x))
        return mx.concatenate([self.branch1x1(x), b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def __call__(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return mx.concatenate([self.branch3x3(x), b3, nn.MaxPool2d(3, 2)(x)], axis=-1)


class FIDInceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def __call__(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d = layer(d)
        bp = self.branch_pool(avg_pool_3x3_exclude_pad(x))
        return mx.concatenate([self.branch1x1(x), b7, d, bp], axis=-1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return mx.concatenate([b3, b7, nn.MaxPool2d(3, 2)(x)], axis=-1)


class FIDInceptionE(nn.Module):
    """`max_pool=False`: pytorch-fid's FIDInceptionE_1 (Mixed_7b); True: FIDInceptionE_2 (Mixed_7c)."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def __call__(self, x):
        b3 = self.branch3x3_1(x)
        b3 = mx.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = mx.concatenate([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], axis=-1)
        pooled = nn.MaxPool2d(3, 1, padding=1)(x) if self.max_pool else avg_pool_3x3_exclude_pad(x)
        return mx.concatenate([self.branch1x1(x), b3, d, self.branch_pool(pooled)], axis=-1)


class FIDInceptionV3(nn.Module):
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, 32)
        self.Mixed_5c = FIDInceptionA(256, 64)
        self.Mixed_5d = FIDInceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, 128)
        self.Mixed_6c = FIDInceptionC(768, 160)
        self.Mixed_6d = FIDInceptionC(768, 160)
        self.Mixed_6e = FIDInceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.eval()

    def pool3(self, x: mx.array) -> mx.array:
        """[B, 299, 299, 3] in [-1, 1] -> [B, 2048] (the final average pool)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = nn.MaxPool2d(3, 2)(x)
        x = nn.MaxPool2d(3, 2)(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                     "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return x.mean(axis=(1, 2))

    @staticmethod
    def resize_input(images: mx.array) -> mx.array:
        """[B, H, W, 3] -> [B, 299, 299, 3], torch's bilinear interpolate (align_corners=False, no antialias)."""
        _, h, w, _ = images.shape
        if (h, w) == (SIZE, SIZE):
            return images
        images = mx.einsum("oh,bhwc->bowc", mx.array(resize_matrix(h, SIZE, "bilinear")), images)
        return mx.einsum("pw,bowc->bopc", mx.array(resize_matrix(w, SIZE, "bilinear")), images)

    def features(self, images: mx.array) -> mx.array:
        """[B, H, W, 3] float in [0, 1] -> [B, 2048] pool3 features, as pytorch-fid computes them."""
        return self.pool3(2 * self.resize_input(images) - 1)

    def __call__(self, images: mx.array) -> mx.array:
        return self.features(images)


def load_inception(folder: str | Path) -> FIDInceptionV3:
    """Build the FID InceptionV3 and strictly load `folder/model.safetensors` (a `python -m convert` output)."""
    return load_strict(FIDInceptionV3(), Path(folder) / "model.safetensors")
