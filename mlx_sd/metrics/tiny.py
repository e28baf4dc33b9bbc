"""Random-weight stand-ins for the three feature models, made by MLX itself (nothing downloaded).

For trying `mlx-sd-eval` end to end (with `mlx-sd-demo`'s model and data): the folders have the
layout `python -m convert --feature-model` writes, but their numbers measure nothing. InceptionV3
is full size (its architecture is fixed); CLIP and DINOv2 are narrow two-layer ViTs. CLIP uses
the bundled SD1.5 (= clip-vit-large-patch14) tokenizer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..configs import SD15

TINY_CLIP = {
    "projection_dim": 32,
    "text_config": dict(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=2),
    "vision_config": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          image_size=64, patch_size=16, hidden_act="quick_gelu"),
}
TINY_DINOV2 = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4, image_size=224,
                   patch_size=14)


def _spread_inception(model) -> None:
    """He-scaled convs and random BatchNorm statistics: with the default init and identity
    statistics the 2048-d features vanish through the ~90 layers (every FID would print 0.000)."""
    params = {}
    for k, v in tree_flatten(model.parameters()):
        if k.endswith("conv.weight"):
            fan_in = v.shape[1] * v.shape[2] * v.shape[3]
            params[k] = mx.random.normal(v.shape) * (2.0 / fan_in) ** 0.5
        elif k.endswith(("bn.weight", "running_var")):
            params[k] = mx.random.uniform(0.5, 1.5, v.shape)
        elif k.endswith(("bn.bias", "running_mean")):
            params[k] = mx.random.normal(v.shape) * 0.1
    model.load_weights(list(params.items()), strict=False)


def make_tiny_feature_models(out: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write `out/{inception,clip,dinov2}` (random, seeded); returns the folders."""
    from ..model_folder import write_marker
    from .features import build_feature_model

    out = Path(out)
    configs = {"inception": {"model_type": "fid_inception_v3", "source_file": "random (demo)"},
               "clip": TINY_CLIP, "dinov2": TINY_DINOV2}
    folders = {}
    for k, (kind, config) in enumerate(configs.items()):
        mx.random.seed(seed + k)
        model = build_feature_model(kind, config)
        if kind == "inception":
            _spread_inception(model)
        folder = out / kind
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
        if kind == "clip":
            for f in (SD15 / "tokenizer").iterdir():
                shutil.copyfile(f, folder / f.name)
        write_marker(folder, "random (demo)", "float32", feature_model=kind)
        folders[kind] = folder
    return folders
