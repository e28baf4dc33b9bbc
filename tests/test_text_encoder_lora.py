"""Text-encoder LoRA: MLX CLIP + LoRA vs PEFT on transformers' CLIPTextModel, our files in diffusers
(`load_lora_weights`, its kohya loader) and PEFT, import by `--lora`, and training with it.

Every parity figure is fixtures.rel_err, float32, tolerance 1e-4.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch

from fixtures import rel_err
from lora import TEXT_ENCODER_ALLOWED, LoRAConfig, inject_lora, lora_layers, text_encoder_predicate
from lora.formats import (
    DIFFUSERS_WEIGHTS,
    KOHYA_WEIGHTS,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    TEXT_ENCODER_DIR,
    AdapterError,
    adapter_from_model,
    apply_adapter,
    export_adapter,
    load_adapter,
    load_into_lora_layers,
)
from mlx_sd.model_folder import ModelFolder

TOL = 1e-4
PROMPTS = ["a product photo of black casual shoes on white background", "blue sneakers", ""]


def _randomize(model, seed):
    key = mx.random.key(seed)
    for _, layer in sorted(lora_layers(model).items()):
        k1, k2, key = mx.random.split(key, 3)
        layer.lora_A.weight = mx.random.normal(layer.lora_A.weight.shape, key=k1) * 0.2
        layer.lora_B.weight = mx.random.normal(layer.lora_B.weight.shape, key=k2) * 0.2
    mx.eval(model.parameters())


def _ids(folder):
    return folder.tokenizer()(PROMPTS)


def _latents(seed=0, dim=32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((len(PROMPTS), 16, 16, 4)).astype(np.float32)
    t = np.array([10, 500, 900], dtype=np.int64)
    return x, t


@pytest.fixture
def trained_pair(tiny_mlx_dir):
    """Tiny UNet and text encoder with random LoRA weights: UNet r=4 alpha=8, text encoder r=4 alpha=8
    on q/k/v/out_proj and fc1/fc2 (alpha != r, so a lost alpha shows)."""
    folder = ModelFolder(tiny_mlx_dir)
    unet, te = folder.unet(), folder.text_encoder()
    inject_lora(unet, LoRAConfig(r=4, alpha=8))
    inject_lora(te, LoRAConfig(r=4, alpha=8), text_encoder_predicate(TEXT_ENCODER_ALLOWED))
    _randomize(unet, 1)
    _randomize(te, 2)
    return folder, unet, te


def _mlx_outputs(folder, unet, te):
    ids = _ids(folder)
    ctx = te(mx.array(ids))
    x, t = _latents()
    out = unet(mx.array(x), mx.array(t), ctx)
    return np.array(ctx), np.array(out)


def _torch_outputs(folder, unet, te):
    ids = torch.from_numpy(_ids(folder).astype(np.int64))
    x, t = _latents()
    with torch.no_grad():
        ctx = te(ids).last_hidden_state
        out = unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), ctx).sample
    return ctx.numpy(), out.permute(0, 2, 3, 1).numpy()


def _torch_text_encoder(diffusers_dir):
    from transformers import CLIPTextModel

    return CLIPTextModel.from_pretrained(str(diffusers_dir / "text_encoder")).eval()


def test_injection_targets_and_counts(tiny_mlx_dir):
    te = ModelFolder(tiny_mlx_dir).text_encoder()
    paths = inject_lora(te, LoRAConfig(r=4, alpha=8), text_encoder_predicate(("q_proj", "k_proj", "v_proj",
                                                                              "out_proj")))
    assert len(paths) == 4 * 2 and all(p.startswith("text_model.encoder.layers.") for p in paths)
    from lora import trainable_count

    assert trainable_count(te) == 2 * 4 * (4 * 32 + 32 * 4)  # 2 layers x 4 projections x (A + B)
    with pytest.raises(ValueError, match="choose from"):
        text_encoder_predicate(("to_q",))


@pytest.mark.parametrize("targets", [("q_proj", "k_proj", "v_proj", "out_proj"), TEXT_ENCODER_ALLOWED])
def test_matches_peft_on_transformers(targets, tiny_mlx_dir, tiny_diffusers_dir):
    """The same LoRA weights in PEFT's CLIPTextModel and in ours give the same text embeddings."""
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model, set_peft_model_state_dict

    folder = ModelFolder(tiny_mlx_dir)
    te = folder.text_encoder()
    base = np.array(te(mx.array(_ids(folder))))
    inject_lora(te, LoRAConfig(r=4, alpha=8), text_encoder_predicate(targets))
    _randomize(te, 3)
    ours = np.array(te(mx.array(_ids(folder))))
    ref = get_peft_model(_torch_text_encoder(tiny_diffusers_dir),
                         PeftConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights="gaussian"))
    sd = {}
    for path, layer in lora_layers(te).items():
        name = path.removeprefix("text_model.")  # transformers >= 5: no text_model level
        sd[f"base_model.model.{name}.lora_A.weight"] = torch.from_numpy(np.array(layer.lora_A.weight))
        sd[f"base_model.model.{name}.lora_B.weight"] = torch.from_numpy(np.array(layer.lora_B.weight))
    result = set_peft_model_state_dict(ref, sd)
    assert not [k for k in result.unexpected_keys if "lora" in k]
    ref.eval()
    with torch.no_grad():
        want = ref(torch.from_numpy(_ids(folder).astype(np.int64))).last_hidden_state.numpy()
    assert rel_err(ours, base) > 1e-2  # the adapter really changes the embeddings
    assert rel_err(ours, want) <= TOL


def _diffusers_pipe(diffusers_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(diffusers_dir), safety_checker=None)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_diffusers_loads_our_file(fmt, trained_pair, tiny_diffusers_dir, tmp_path):
    folder, unet, te = trained_pair
    export_adapter(adapter_from_model(unet, text_encoder=te), tmp_path)
    pipe = _diffusers_pipe(tiny_diffusers_dir)
    base_ctx, _ = _torch_outputs(folder, pipe.unet, pipe.text_encoder)
    pipe.load_lora_weights(str(tmp_path), weight_name=DIFFUSERS_WEIGHTS if fmt == "diffusers" else KOHYA_WEIGHTS)
    ctx, out = _mlx_outputs(folder, unet, te)
    want_ctx, want_out = _torch_outputs(folder, pipe.unet, pipe.text_encoder)
    assert rel_err(ctx, base_ctx) > 1e-2
    assert rel_err(ctx, want_ctx) <= TOL, "text embeddings"
    assert rel_err(out, want_out) <= TOL, "UNet output on those embeddings"


def test_peft_loads_our_folders(trained_pair, tiny_diffusers_dir, tmp_path):
    from diffusers import UNet2DConditionModel as TorchUNet
    from peft import PeftModel

    folder, unet, te = trained_pair
    written = export_adapter(adapter_from_model(unet, text_encoder=te), tmp_path)
    assert written["peft_text_encoder"] == tmp_path / TEXT_ENCODER_DIR / PEFT_WEIGHTS
    cfg = json.loads((tmp_path / TEXT_ENCODER_DIR / PEFT_CONFIG).read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and set(cfg["target_modules"]) == set(TEXT_ENCODER_ALLOWED)
    peft_unet = PeftModel.from_pretrained(TorchUNet.from_pretrained(str(tiny_diffusers_dir / "unet")),
                                          str(tmp_path)).eval()
    peft_te = PeftModel.from_pretrained(_torch_text_encoder(tiny_diffusers_dir), str(tmp_path / TEXT_ENCODER_DIR))
    ctx, out = _mlx_outputs(folder, unet, te)
    want_ctx, want_out = _torch_outputs(folder, peft_unet, peft_te.eval())
    assert rel_err(ctx, want_ctx) <= TOL, "text embeddings"
    assert rel_err(out, want_out) <= TOL, "UNet output on those embeddings"


@pytest.mark.parametrize("source", ["folder", DIFFUSERS_WEIGHTS, KOHYA_WEIGHTS])
def test_import_applies_to_both_models(source, trained_pair, tmp_path):
    """`load_adapter` + `apply_adapter` (what --lora does) on fresh models == the trained pair."""
    folder, unet, te = trained_pair
    export_adapter(adapter_from_model(unet, text_encoder=te), tmp_path)
    adapter = load_adapter(tmp_path if source == "folder" else tmp_path / source)
    assert adapter.text_encoder is not None and len(adapter.text_encoder.A) == 6 * 2
    fresh_unet, fresh_te = folder.unet(), folder.text_encoder()
    with pytest.raises(AdapterError, match="text-encoder LoRA"):
        apply_adapter(fresh_unet, adapter)  # refused as a whole: nothing half-applied
    assert apply_adapter(fresh_unet, adapter, text_encoder=fresh_te) == len(lora_layers(unet)) + 12
    want_ctx, want_out = _mlx_outputs(folder, unet, te)
    ctx, out = _mlx_outputs(folder, fresh_unet, fresh_te)
    assert rel_err(ctx, want_ctx) <= 1e-5 and rel_err(out, want_out) <= 1e-5


def test_pipeline_lora_uses_the_text_encoder_part(trained_pair, tiny_mlx_dir, tmp_path):
    from mlx_sd.pipeline import StableDiffusion

    folder, unet, te = trained_pair
    export_adapter(adapter_from_model(unet, text_encoder=te), tmp_path, formats=("kohya",))
    sd = StableDiffusion.from_folder(tiny_mlx_dir)
    sd.encode_prompt(PROMPTS[:1])  # fills the text cache, which the adapter must invalidate
    sd.add_adapter(tmp_path / KOHYA_WEIGHTS, scale=0.5)
    half = ModelFolder(tiny_mlx_dir).text_encoder()  # the trained LoRA at half strength, unfused
    inject_lora(half, LoRAConfig(r=4, alpha=4), text_encoder_predicate(TEXT_ENCODER_ALLOWED))
    for p, layer in lora_layers(half).items():
        layer.lora_A.weight, layer.lora_B.weight = lora_layers(te)[p].lora_A.weight, lora_layers(te)[p].lora_B.weight
    want = half(mx.array(_ids(folder)[:1]))
    cond, _ = sd.encode_prompt(PROMPTS[:1])
    assert rel_err(np.array(cond), np.array(te(mx.array(_ids(folder)[:1])))) > 1e-2  # not full strength
    assert rel_err(np.array(cond), np.array(want)) <= 1e-5


def test_continue_training_needs_matching_parts(trained_pair, tmp_path):
    folder, unet, te = trained_pair
    export_adapter(adapter_from_model(unet, text_encoder=te), tmp_path, formats=("peft",))
    u2, t2 = folder.unet(), folder.text_encoder()
    inject_lora(u2, LoRAConfig(r=4, alpha=8))
    with pytest.raises(AdapterError, match="train the text encoder too"):
        load_into_lora_layers(u2, load_adapter(tmp_path))
    inject_lora(t2, LoRAConfig(r=4, alpha=8), text_encoder_predicate(TEXT_ENCODER_ALLOWED))
    load_into_lora_layers(u2, load_adapter(tmp_path), text_encoder=t2)
    assert all(mx.array_equal(l.lora_B.weight, lora_layers(te)[p].lora_B.weight).item()
               for p, l in lora_layers(t2).items())
    export_adapter(adapter_from_model(unet), tmp_path / "unet_only", formats=("peft",))
    with pytest.raises(AdapterError, match="no text-encoder LoRA"):
        load_into_lora_layers(u2, load_adapter(tmp_path / "unet_only"), text_encoder=t2)
    assert not (tmp_path / "unet_only" / TEXT_ENCODER_DIR).exists()
