"""The Stable Diffusion VAE (`AutoencoderKL`) in MLX.

Layouts and units:
- images are NHWC float32 in [-1, 1] (`[B, H, W, 3]`), H and W divisible by
  2**(len(block_out_channels) - 1) (8 for SD);
- latents are NHWC `[B, H/8, W/8, latent_channels]` and *unscaled*: multiply by `scaling_factor`
  before the UNet, divide by it before `decode`, as diffusers pipelines do;
- attribute names equal diffusers' names; conv weights are OHWI. The mid-block attention uses the
  current names `to_q/to_k/to_v/to_out.0` as Linear layers (old `query/key/value/proj_attn`
  checkpoints are renamed by `convert.layout`).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .config import VAEConfig, read_json
from .unet import Downsample2D, ResnetBlock2D, Upsample2D
from .weights import load_strict

_EPS = 1e-6  # diffusers' Encoder/Decoder use eps 1e-6 in every norm


class VAEAttention(nn.Module):
    """Single-head self-attention over H*W positions with GroupNorm and a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=_EPS, pytorch_compatible=True)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = [nn.Linear(channels, channels)]  # diffusers' key "to_out.0"
        self.scale = channels**-0.5

    def __call__(self, x):
        B, H, W, C = x.shape
        h = self.group_norm(x).reshape(B, 1, H * W, C)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.to_out[0](out).reshape(B, H, W, C) + x


class UNetMidBlock2D(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = [ResnetBlock2D(channels, channels, None, groups, _EPS) for _ in range(2)]
        self.attentions = [VAEAttention(channels, groups)]

    def __call__(self, x):
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool):
        super().__init__()
        self.resnets = [
            ResnetBlock2D(in_channels if j == 0 else out_channels, out_channels, None, groups, _EPS)
            for j in range(num_layers)
        ]
        if add_downsample:
            # padding 0: diffusers pads bottom/right only, then a stride-2 conv.
            self.downsamplers = [Downsample2D(out_channels, padding=0)]

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if "downsamplers" in self:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = [
            ResnetBlock2D(in_channels if j == 0 else out_channels, out_channels, None, groups, _EPS)
            for j in range(num_layers)
        ]
        if add_upsample:
            self.upsamplers = [Upsample2D(out_channels)]

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if "upsamplers" in self:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.down_blocks = [
            DownEncoderBlock2D(chs[max(i - 1, 0)], chs[i], cfg.layers_per_block, g, add_downsample=i < len(chs) - 1)
            for i in range(len(chs))
        ]
        self.mid_block = UNetMidBlock2D(chs[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, chs[-1], eps=_EPS, pytorch_compatible=True)
        # Mean and log-variance ("double_z").
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.latent_channels, 3, padding=1)

    def __call__(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, g = cfg.block_out_channels, cfg.norm_num_groups
        rev = chs[::-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, chs[-1], 3, padding=1)
        self.mid_block = UNetMidBlock2D(chs[-1], g)
        self.up_blocks = [
            UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, g, add_upsample=i < len(chs) - 1)
            for i in range(len(chs))
        ]
        self.conv_norm_out = nn.GroupNorm(g, chs[0], eps=_EPS, pytorch_compatible=True)
        self.conv_out = nn.Conv2d(chs[0], cfg.out_channels, 3, padding=1)

    def __call__(self, z):
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


def sample_latent(mean: mx.array, logvar: mx.array, key: mx.array | None = None) -> mx.array:
    """One draw from the diagonal Gaussian N(mean, exp(logvar)), diffusers' `latent_dist.sample()`."""
    return mean + mx.exp(0.5 * logvar) * mx.random.normal(mean.shape, dtype=mean.dtype, key=key)


class AutoencoderKL(nn.Module):
    """`encode(image) -> (mean, logvar)`, `sample(mean, logvar, key) -> z`, `decode(z) -> image`."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        c = 2 * config.latent_channels
        self.quant_conv = nn.Conv2d(c, c, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    def encode(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Image [B,H,W,3] in [-1, 1] -> (mean, logvar), each [B,H/8,W/8,latent_channels], unscaled."""
        mean, logvar = mx.split(self.quant_conv(self.encoder(x)), 2, axis=-1)
        # Same clamp as diffusers' DiagonalGaussianDistribution: keeps exp() finite.
        return mean, mx.clip(logvar, -30.0, 20.0)

    sample = staticmethod(sample_latent)

    def decode(self, z: mx.array) -> mx.array:
        """Unscaled latent [B,h,w,latent_channels] -> image [B,8h,8w,3], roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def __call__(self, x: mx.array, key: mx.array | None = None) -> mx.array:
        """Encode, sample and decode (a full round trip)."""
        return self.decode(self.sample(*self.encode(x), key=key))


def load_vae(folder: str | Path) -> AutoencoderKL:
    """Build the VAE from `folder/config.json` and load `folder/model.safetensors` (MLX layout)."""
    folder = Path(folder)
    config = VAEConfig.from_diffusers(read_json(folder / "config.json"))
    return load_strict(AutoencoderKL(config), folder / "model.safetensors")
