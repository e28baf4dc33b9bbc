"""The Stable Diffusion 1.x/2.x UNet (`UNet2DConditionModel`) in MLX.

Layouts and units:
- `sample` and every feature map are NHWC float32 (`[B, H, W, C]`); H and W of the latent must be
  divisible by 2**(number of down blocks - 1) (8 for SD1.5: 512 px images -> 64x64 latents).
- `timesteps` are diffusion steps in [0, num_train_timesteps), one per batch element (int or
  float; a scalar is broadcast to the batch).
- `encoder_hidden_states` is the text encoder's last hidden state `[B, 77, cross_attention_dim]`.
- Weights: attribute names equal diffusers' names, so `tree_flatten(unet.parameters())` keys are
  the diffusers state-dict keys. Conv weights are OHWI (`nn.Conv2d`); the transformer
  `proj_in`/`proj_out` are `nn.Linear` whatever `use_linear_projection` says (a 1x1 conv on NHWC
  is a Linear; `convert.layout` squeezes the conv weights).

The attention projections `to_q`, `to_k`, `to_v` and `to_out[0]` are plain `nn.Linear` modules
called as `self.to_q(x)`, so LoRA injection can swap them in the module tree.

`ResnetBlock2D`, `Downsample2D` and `Upsample2D` are shared with the VAE (`mlx_sd.vae`).
"""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .attention import DEFAULT_CHUNK, attention, chunks
from .config import UNetConfig, read_json
from .conv import Conv2d
from .weights import load_strict


def _run(module: nn.Module, *args):
    """Call `module`, recomputing its activations in the backward pass if it asks for that.

    `nn.utils.checkpoint` passes the module's trainable parameters as explicit inputs, so
    gradients still reach them (and any LoRA adapters inside).
    """
    if module.gradient_checkpointing:
        return nn.utils.checkpoint(module)(*args)
    return module(*args)


def timestep_embedding(timesteps: mx.array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> mx.array:
    """Sinusoidal embedding `[B, dim]`, diffusers' `get_timestep_embedding` with scale 1."""
    half = dim // 2
    exponent = -math.log(max_period) * mx.arange(half, dtype=mx.float32) / (half - freq_shift)
    args = timesteps.astype(mx.float32)[:, None] * mx.exp(exponent)[None]
    sin, cos = mx.sin(args), mx.cos(args)
    emb = mx.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = mx.pad(emb, [(0, 0), (0, 1)])
    return emb


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def __call__(self, x):
        return self.linear_2(nn.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """norm1 -> silu -> conv1 (+ time projection) -> norm2 -> silu -> conv2, plus the shortcut.

    Dropout is omitted: SD checkpoints use p=0. `temb_channels=None` (the VAE) drops the time
    projection.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, groups: int,
                 eps: float, output_scale_factor: float = 1.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, pytorch_compatible=True)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels is not None:
            self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps, pytorch_compatible=True)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        self.output_scale_factor = output_scale_factor
        self.gradient_checkpointing = False

    def __call__(self, x, temb=None):
        h = self.conv1(nn.silu(self.norm1(x)))
        if temb is not None:
            h = h + self.time_emb_proj(nn.silu(temb))[:, None, None, :]
        h = self.conv2(nn.silu(self.norm2(h)))
        if "conv_shortcut" in self:
            x = self.conv_shortcut(x)
        out = x + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. `padding=0` (the VAE) pads only bottom/right by one, as diffusers does."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding)

    def __call__(self, x):
        if self.padding == 0:
            x = mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)])
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x):
        B, H, W, C = x.shape
        x = mx.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C)).reshape(B, 2 * H, 2 * W, C)
        return self.conv(x)


class Attention(nn.Module):
    """Multi-head (cross-)attention; `context=None` means self-attention."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head**-0.5
        # SD's q/k/v projections have no bias (diffusers' attention_bias=False); the output does.
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        # diffusers' to_out is [Linear, Dropout]; only index 0 holds weights ("to_out.0").
        self.to_out = [nn.Linear(inner, query_dim)]
        self.chunk = DEFAULT_CHUNK  # query rows per piece at large token counts (mlx_sd.attention)

    def project(self, x, context=None):
        """q, k, v as `[B, heads, tokens, dim_head]`."""
        context = x if context is None else context
        B, L, _ = x.shape
        S = context.shape[1]
        q = self.to_q(x).reshape(B, L, self.heads, -1).transpose(0, 2, 1, 3)
        k = self.to_k(context).reshape(B, S, self.heads, -1).transpose(0, 2, 1, 3)
        v = self.to_v(context).reshape(B, S, self.heads, -1).transpose(0, 2, 1, 3)
        return q, k, v

    def core(self, q, k, v, min_tokens: int | None = None):
        """softmax(q k^T / sqrt(dim_head)) v, chunked as `mlx_sd.attention.attention` decides."""
        return attention(q, k, v, self.scale, self.chunk, min_tokens)

    def output(self, o):
        B, _, L, _ = o.shape
        return self.to_out[0](o.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def __call__(self, x, context=None):
        return self.output(self.core(*self.project(x, context)))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def __call__(self, x):
        h, gate = mx.split(self.proj(x), 2, axis=-1)
        return h * nn.gelu(gate)  # exact (erf) GELU, as torch's F.gelu default


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # Index 1 stands in for diffusers' Dropout so the output Linear keeps the key "net.2".
        self.net = [GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)]

    def __call__(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, dim, heads, dim_head)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads, dim_head)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def __call__(self, x, context, checkpoint: bool = False):
        """`checkpoint=True` recomputes the block's activations in the backward pass, with one
        exception: a self-attention over at least `attn1.chunk` tokens runs as
        `mlx_sd.attention`'s chunked form, whose backward recomputes its probabilities by
        itself, and only its q, k, v and output are kept (four tokens x channels arrays). The
        recomputation then skips the block's costliest op. Shorter self-attentions are
        recomputed with the rest: their fused backward keeps the tokens x tokens probabilities.
        """
        if not checkpoint:
            return self._whole(x, context)
        rows = self.attn1.chunk
        if not chunks(x.shape[1], rows, min_tokens=rows):
            return nn.utils.checkpoint(self, self._whole)(x, context)
        q, k, v = nn.utils.checkpoint(self, self._self_qkv)(x)
        o = self.attn1.core(q, k, v, min_tokens=rows)
        return nn.utils.checkpoint(self, self._rest_from_core)(x, o, context)

    def _whole(self, x, context):
        return self._rest(x, self.attn1(self.norm1(x)), context)

    def _self_qkv(self, x):
        return self.attn1.project(self.norm1(x))

    def _rest_from_core(self, x, o, context):
        return self._rest(x, self.attn1.output(o), context)

    def _rest(self, x, attn1_out, context):
        x = x + attn1_out
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """GroupNorm -> proj_in -> transformer blocks over H*W tokens -> proj_out, plus the input."""

    def __init__(self, heads: int, channels: int, num_layers: int, context_dim: int, groups: int):
        super().__init__()
        dim_head = channels // heads
        inner = heads * dim_head
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6, pytorch_compatible=True)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = [
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(num_layers)
        ]
        self.proj_out = nn.Linear(inner, channels)
        self.gradient_checkpointing = False

    def __call__(self, x, context):
        """With `gradient_checkpointing` the input projection and each transformer block are
        recomputed in the backward pass (large self-attentions excepted, see
        `BasicTransformerBlock`)."""
        B, H, W, C = x.shape
        ckpt = self.gradient_checkpointing
        h = (nn.utils.checkpoint(self, self._project_in) if ckpt else self._project_in)(x)
        for block in self.transformer_blocks:
            h = block(h, context, checkpoint=ckpt)
        return self.proj_out(h).reshape(B, H, W, C) + x

    def _project_in(self, x):
        B, H, W, C = x.shape
        return self.proj_in(self.norm(x).reshape(B, H * W, C))


class DownBlock(nn.Module):
    """diffusers' CrossAttnDownBlock2D (`cross_attention=True`) or DownBlock2D."""

    def __init__(self, cfg: UNetConfig, i: int, in_channels: int, temb_channels: int,
                 cross_attention: bool, add_downsample: bool):
        super().__init__()
        out_channels = cfg.block_out_channels[i]
        n = cfg.layers_per_block[i]
        self.resnets = [
            ResnetBlock2D(in_channels if j == 0 else out_channels, out_channels, temb_channels,
                          cfg.norm_num_groups, cfg.norm_eps)
            for j in range(n)
        ]
        if cross_attention:
            self.attentions = [
                Transformer2DModel(cfg.num_attention_heads[i], out_channels,
                                   cfg.transformer_layers_per_block[i], cfg.cross_attention_dim,
                                   cfg.norm_num_groups)
                for _ in range(n)
            ]
        if add_downsample:
            self.downsamplers = [Downsample2D(out_channels, cfg.downsample_padding)]

    def __call__(self, x, temb, context):
        """Returns the output and the skip connections it hands to the up path."""
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = _run(resnet, x, temb)
            if "attentions" in self:
                x = self.attentions[j](x, context)
            skips.append(x)
        if "downsamplers" in self:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """diffusers' CrossAttnUpBlock2D (`cross_attention=True`) or UpBlock2D; `i` counts up blocks."""

    def __init__(self, cfg: UNetConfig, i: int, prev_output_channels: int, temb_channels: int,
                 cross_attention: bool, add_upsample: bool):
        super().__init__()
        rev = cfg.block_out_channels[::-1]
        out_channels = rev[i]
        in_channels = rev[min(i + 1, len(rev) - 1)]
        heads = cfg.num_attention_heads[::-1][i]
        n = cfg.layers_per_block[::-1][i] + 1
        self.resnets = []
        for j in range(n):
            # Each resnet eats one skip connection; the last one comes from the previous level.
            skip_channels = in_channels if j == n - 1 else out_channels
            resnet_in = prev_output_channels if j == 0 else out_channels
            self.resnets.append(ResnetBlock2D(resnet_in + skip_channels, out_channels, temb_channels,
                                              cfg.norm_num_groups, cfg.norm_eps))
        if cross_attention:
            self.attentions = [
                Transformer2DModel(heads, out_channels, cfg.transformer_layers_per_block[::-1][i],
                                   cfg.cross_attention_dim, cfg.norm_num_groups)
                for _ in range(n)
            ]
        if add_upsample:
            self.upsamplers = [Upsample2D(out_channels)]

    def __call__(self, x, temb, skips: list, context):
        """`skips` is the down path's stack; this block pops one entry per resnet."""
        for j, resnet in enumerate(self.resnets):
            x = mx.concatenate([x, skips.pop()], axis=-1)  # torch.cat(dim=1): x first, then skip
            x = _run(resnet, x, temb)
            if "attentions" in self:
                x = self.attentions[j](x, context)
        if "upsamplers" in self:
            x = self.upsamplers[0](x)
        return x


class UNetMidBlock2DCrossAttn(nn.Module):
    def __init__(self, cfg: UNetConfig, temb_channels: int):
        super().__init__()
        ch = cfg.block_out_channels[-1]
        resnet = lambda: ResnetBlock2D(ch, ch, temb_channels, cfg.norm_num_groups, cfg.norm_eps,  # noqa: E731
                                       cfg.mid_block_scale_factor)
        self.resnets = [resnet(), resnet()]
        self.attentions = [
            Transformer2DModel(cfg.num_attention_heads[-1], ch, cfg.transformer_layers_per_block[-1],
                               cfg.cross_attention_dim, cfg.norm_num_groups)
        ]

    def __call__(self, x, temb, context):
        x = _run(self.resnets[0], x, temb)
        x = self.attentions[0](x, context)
        return _run(self.resnets[1], x, temb)


class UNet2DConditionModel(nn.Module):
    """SD1.x/2.x UNet: `unet(sample [B,H,W,C_in], timesteps [B], context [B,S,D]) -> [B,H,W,C_out]`.

    `gradient_checkpointing=True` (or setting the attribute later) recomputes every resnet and
    transformer block's activations during the backward pass: less memory, same numbers. Self-
    attentions over `attention_chunk` tokens or more are not run again; they keep q, k, v and
    their output. `attention_chunk` is the query chunk of the large self-attentions
    (`mlx_sd.attention`; 0 = never chunk).
    """

    def __init__(self, config: UNetConfig, gradient_checkpointing: bool = False):
        super().__init__()
        self.config = config
        ch0 = config.block_out_channels[0]
        temb_channels = ch0 * 4
        self.conv_in = nn.Conv2d(config.in_channels, ch0, 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch0, temb_channels)

        n = len(config.block_out_channels)
        self.down_blocks = []
        in_ch = ch0
        for i, kind in enumerate(config.down_block_types):
            self.down_blocks.append(DownBlock(config, i, in_ch, temb_channels,
                                              kind == "CrossAttnDownBlock2D", add_downsample=i < n - 1))
            in_ch = config.block_out_channels[i]
        self.mid_block = UNetMidBlock2DCrossAttn(config, temb_channels)
        self.up_blocks = []
        prev = config.block_out_channels[-1]
        for i, kind in enumerate(config.up_block_types):
            self.up_blocks.append(UpBlock(config, i, prev, temb_channels,
                                          kind == "CrossAttnUpBlock2D", add_upsample=i < n - 1))
            prev = config.block_out_channels[::-1][i]
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, ch0, eps=config.norm_eps,
                                          pytorch_compatible=True)
        self.conv_out = nn.Conv2d(ch0, config.out_channels, 3, padding=1)
        self.gradient_checkpointing = gradient_checkpointing

    @property
    def gradient_checkpointing(self) -> bool:
        return self._gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool):
        self._gradient_checkpointing = bool(on)
        for _, module in self.named_modules():
            if isinstance(module, (ResnetBlock2D, Transformer2DModel)):
                module.gradient_checkpointing = bool(on)

    @property
    def attention_chunk(self) -> int:
        return next(m.chunk for _, m in self.named_modules() if isinstance(m, Attention))

    @attention_chunk.setter
    def attention_chunk(self, rows: int):
        for _, module in self.named_modules():
            if isinstance(module, Attention):
                module.chunk = int(rows)

    def __call__(self, sample: mx.array, timesteps, encoder_hidden_states: mx.array) -> mx.array:
        B, H, W, _ = sample.shape
        factor = 2 ** (len(self.up_blocks) - 1)
        if H % factor or W % factor:
            raise ValueError(f"UNet: latent size {H}x{W} must be divisible by {factor} "
                             f"(image size divisible by {8 * factor} for SD)")
        dtype = self.conv_in.weight.dtype  # a low-precision base runs its activations low too
        sample, encoder_hidden_states = sample.astype(dtype), encoder_hidden_states.astype(dtype)
        timesteps = mx.array(timesteps) if not isinstance(timesteps, mx.array) else timesteps
        timesteps = mx.broadcast_to(timesteps.reshape(-1), (B,))
        cfg = self.config
        temb = timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = self.time_embedding(temb.astype(sample.dtype))

        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, encoder_hidden_states)
            skips.extend(block_skips)
        x = self.mid_block(x, temb, encoder_hidden_states)
        for block in self.up_blocks:
            x = block(x, temb, skips, encoder_hidden_states)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


def load_unet(folder: str | Path, gradient_checkpointing: bool = False) -> UNet2DConditionModel:
    """Build the UNet from `folder/config.json` and load `folder/model.safetensors` (MLX layout)."""
    folder = Path(folder)
    config = UNetConfig.from_diffusers(read_json(folder / "config.json"))
    unet = UNet2DConditionModel(config, gradient_checkpointing=gradient_checkpointing)
    return load_strict(unet, folder / "model.safetensors")
