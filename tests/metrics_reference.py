"""Reference implementations for the evaluation tests, and seeded feature-model fixtures.

pytorch-fid and torch-fidelity import `torchvision`, and no torchvision build for this CPU torch
is installable without replacing torch. `reference_fid()` therefore puts a stand-in package named
`torchvision` into `sys.modules` whose `__path__` is an unpacked torchvision wheel's
`torchvision/` folder (its `__init__` is never run, so its compiled ops are never loaded), imports
pytorch-fid and torch-fidelity, and removes the stand-in again. The folder comes from
$MLX_SD_TORCHVISION_SRC or ~/.cache/mlx-sd-tests/torchvision; set it up
(and the references, installed without their dependencies) with `python tests/setup_references.py`.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import json
import math
import os
import sys
import types
from pathlib import Path

import pytest

TV_SRC = Path(os.environ.get("MLX_SD_TORCHVISION_SRC", Path.home() / ".cache/mlx-sd-tests/torchvision"))
_CACHE: dict = {}


def _missing(why: str):
    """Skip where the references are not set up; fail where they must be (MLX_SD_REQUIRE_REFERENCES=1, as CI)."""
    if os.environ.get("MLX_SD_REQUIRE_REFERENCES"):
        raise RuntimeError(why)
    pytest.skip(why)


def reference_fid():
    """(pytorch_fid.inception, pytorch_fid.fid_score, torch_fidelity.metric_kid, torchmetrics CLIPScore),
    or skip saying why."""
    if "mods" in _CACHE:
        return _CACHE["mods"]
    if not (TV_SRC / "models" / "inception.py").exists():
        _missing(f"no unpacked torchvision at {TV_SRC} (run `python tests/setup_references.py`)")
    for name in ("pytorch_fid", "torch_fidelity", "torchmetrics"):
        if importlib.util.find_spec(name) is None:
            _missing(f"{name} is not installed (run `python tests/setup_references.py`)")
    # transformers decides once whether torchvision exists; it must decide before the stand-in appears.
    import transformers.image_utils
    import transformers.modeling_utils  # noqa: F401
    from transformers.utils import is_torchvision_available

    is_torchvision_available()
    stand_in = types.ModuleType("torchvision")
    stand_in.__path__ = [str(TV_SRC)]
    stand_in.__version__ = "0.28.0"
    stand_in.__spec__ = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
    saved = {k: v for k, v in sys.modules.items() if k == "torchvision" or k.startswith("torchvision.")}
    sys.modules["torchvision"] = stand_in
    try:
        from pytorch_fid import fid_score, inception
        from torch_fidelity import metric_kid
        from torchmetrics.multimodal.clip_score import CLIPScore
    finally:
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    _CACHE["mods"] = (inception, fid_score, metric_kid, CLIPScore)
    return _CACHE["mods"]


def random_inception_state(seed: int = 0) -> dict:
    """A seeded state dict for pytorch-fid's network (torchvision Inception3, 1008 classes, no aux).

    Default init leaves BatchNorm at identity statistics and the features vanish through ~90 layers
    (~1e-8): the convs are He-scaled and the BatchNorm affine and statistics randomised instead.
    """
    import torch

    inception, *_ = reference_fid()
    torch.manual_seed(seed)
    net = inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    g = torch.Generator().manual_seed(seed)
    sd = net.state_dict()
    with torch.no_grad():
        for k, v in sd.items():
            if k.endswith("conv.weight"):
                fan_in = v.shape[1] * v.shape[2] * v.shape[3]
                v.copy_(torch.randn(v.shape, generator=g) * math.sqrt(2.0 / fan_in))
            elif k.endswith(("bn.weight", "running_var")):
                v.copy_(0.5 + torch.rand(v.shape, generator=g))
            elif k.endswith(("bn.bias", "running_mean")):
                v.copy_(torch.randn(v.shape, generator=g) * 0.1)
            elif v.is_floating_point():
                v.copy_(torch.randn(v.shape, generator=g) * 0.01)
    return sd


@contextlib.contextmanager
def fid_weights(state: dict):
    """Inside: pytorch-fid builds its network with `state` instead of downloading its weights."""
    inception, *_ = reference_fid()
    orig = inception.load_state_dict_from_url
    inception.load_state_dict_from_url = lambda *a, **k: state
    try:
        yield
    finally:
        inception.load_state_dict_from_url = orig


def reference_inception(state: dict):
    """pytorch-fid's `InceptionV3([3])` (pool3) built with `state` instead of the downloaded weights."""
    inception, *_ = reference_fid()
    with fid_weights(state):
        return inception.InceptionV3([3]).eval()


def randomize(model, seed: int, scale: float = 0.1) -> None:
    """Perturb every norm/layer-scale parameter so a dropped affine or scale cannot go unnoticed."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "lambda1" in name or "class_embedding" in name or "cls_token" in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)
            if "position_embedding" in name:
                p.normal_(0, 0.5, generator=g)


TINY_CLIP_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                        image_size=32, patch_size=8, hidden_act="quick_gelu")
TINY_DINOV2 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4, image_size=56,
                   patch_size=14)
# openai/clip-vit-large-patch14 and facebook/dinov2-large, as their config.json files state them.
CLIP_L14_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="quick_gelu", projection_dim=768)
CLIP_L14_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     max_position_embeddings=77, hidden_act="quick_gelu", vocab_size=49408, eos_token_id=2,
                     projection_dim=768)
DINOV2_L14 = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, image_size=518,
                  patch_size=14, layerscale_value=1.0)


def make_tiny_clip(folder: Path, seed: int = 0):
    """A tiny transformers CLIPModel (random, seeded) saved with the tiny CLIP tokenizer; returns the model."""
    import torch
    from fixtures import write_tiny_tokenizer_files
    from transformers import CLIPConfig, CLIPModel

    folder = Path(folder)
    vocab = write_tiny_tokenizer_files(folder)
    text = dict(vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                pad_token_id=vocab - 1)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=TINY_CLIP_VISION, projection_dim=24)).eval()
    randomize(model, seed)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32},
        "crop_size": {"height": 32, "width": 32}}))
    return model


def make_tiny_dinov2(folder: Path, seed: int = 0):
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(**TINY_DINOV2)).eval()
    randomize(model, seed)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def torch_state_to_mx(model) -> dict:
    import mlx.core as mx

    return {k: mx.array(v.detach().float().numpy()) for k, v in model.state_dict().items()}
