"""Seeded factory for tiny SD1.5-shaped pipelines, written as real diffusers folders.

Nothing is downloaded: the UNet, VAE and CLIP text encoder are built from small configs with
random (seeded) weights, the CLIP tokenizer's vocab/merges files are written here, and the
scheduler config is SD1.5's own (mlx_sd/configs/sd15/scheduler). The UNet keeps SD1.5's block
structure (3 cross-attention down blocks + 1 plain, mid block, 1 plain + 3 cross-attention up
blocks, 2 resnets per block), only narrower.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mlx_sd.configs import SD15  # the published SD1.5 configs and tokenizer, shipped with the package


def rel_err(ours, ref) -> float:
    """The parity measure of every test: max |ours - ref| / max |ref|, in float64.

    Both sides in the same layout (use `nhwc` for a torch NCHW reference); MLX, numpy and torch
    arrays are accepted.
    """
    a = np.asarray(ours.detach() if hasattr(ours, "detach") else ours, dtype=np.float64)
    b = np.asarray(ref.detach() if hasattr(ref, "detach") else ref, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def nhwc(t):
    """A torch NCHW tensor as an NHWC numpy array."""
    return t.detach().numpy().transpose(0, 2, 3, 1)

TINY_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=32,
    attention_head_dim=2,  # SD1.5 semantics: the number of heads
    norm_num_groups=32,
)

TINY_VAE = dict(
    sample_size=64,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    scaling_factor=0.18215,
)

TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=32,
)

# Words whose BPE merges the tiny tokenizer knows; anything else falls back to byte tokens.
_WORDS = (
    "a photo of black brown white blue casual shoes sneakers leather on background high "
    "quality product photography professional centered modern design the"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte <-> printable-unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"),
                                                                                                      ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tiny_tokenizer_files(folder: Path) -> int:
    """Write a CLIP-style vocab.json/merges.txt; returns the vocabulary size."""
    base = list(_bytes_to_unicode().values())
    vocab = base + [c + "</w>" for c in base]
    merges = []
    for word in _WORDS:
        chars = list(word[:-1]) + [word[-1] + "</w>"]
        cur = chars[0]
        for nxt in chars[1:]:
            pair = f"{cur} {nxt}"
            cur = cur + nxt
            if pair not in merges:
                merges.append(pair)
                if cur not in vocab:
                    vocab.append(cur)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).write_text((SD15 / "tokenizer" / name).read_text())
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    # CLIP's reader skips the first line of merges.txt.
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return len(vocab)


def _randomize_norms(model, generator) -> None:
    """Default init leaves norms at weight 1 / bias 0, which would hide a dropped affine."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                noise = torch.randn(p.shape, generator=generator) * 0.1
                p.add_(noise)


def make_tiny_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Build and `save_pretrained` a tiny StableDiffusionPipeline into `path` (a diffusers folder)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    tok_dir = path / "tokenizer"
    vocab_size = write_tiny_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    _randomize_norms(unet, gen)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_VAE)
    _randomize_norms(vae, gen)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(vocab_size=vocab_size, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                       pad_token_id=vocab_size - 1, **TINY_TEXT)
    )
    _randomize_norms(text_encoder, gen)
    scheduler = PNDMScheduler.from_config(json.loads((SD15 / "scheduler" / "scheduler_config.json").read_text()))

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    # Keep the tokenizer folder as the SD1.5 repo ships it: vocab.json + merges.txt + configs.
    (tok_dir / "tokenizer.json").unlink(missing_ok=True)
    write_tiny_tokenizer_files(tok_dir)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (tok_dir / name).write_text((SD15 / "tokenizer" / name).read_text())
    return path
