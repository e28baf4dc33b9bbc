"""LoRA layers, injection and adapter files, checked against diffusers and PEFT."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch

from fixtures import SD15, rel_err
from lora import LoRAConfig, fuse_lora, inject_lora, lora_layers, trainable_count
from lora.export import export_adapter, save_fused_model
from lora.formats import (
    DIFFUSERS_WEIGHTS,
    KOHYA_WEIGHTS,
    PEFT_WEIGHTS,
    AdapterError,
    adapter_from_model,
    apply_adapter,
    load_adapter,
    load_into_lora_layers,
    resolve,
)
from mlx_sd.config import UNetConfig, read_json
from mlx_sd.model_folder import ModelFolder
from mlx_sd.unet import UNet2DConditionModel

TOL = 1e-4


def _inputs(seed=0, batch=2, size=16, dim=32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, size, size, 4)).astype(np.float32)
    t = np.array([10, 800][:batch], dtype=np.int64)
    ctx = rng.standard_normal((batch, 77, dim)).astype(np.float32)
    return x, t, ctx


def _mlx_out(unet, x, t, ctx):
    return np.array(unet(mx.array(x), mx.array(t), mx.array(ctx)))


def _torch_out(unet, x, t, ctx):
    with torch.no_grad():
        out = unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(ctx)).sample
    return out.permute(0, 2, 3, 1).numpy()




def _randomize(model, seed, scale=0.1):
    """Seeded non-zero A and B in every LoRA layer of `model` (UNet or text encoder)."""
    key = mx.random.key(seed)
    for _, layer in sorted(lora_layers(model).items()):
        k1, k2, key = mx.random.split(key, 3)
        layer.lora_A.weight = mx.random.normal(layer.lora_A.weight.shape, key=k1) * scale
        layer.lora_B.weight = mx.random.normal(layer.lora_B.weight.shape, key=k2) * scale
    mx.eval(model.parameters())


@pytest.fixture
def tiny_unet(tiny_mlx_dir):
    return ModelFolder(tiny_mlx_dir).unet()


@pytest.fixture
def trained_like(tiny_mlx_dir):
    """Tiny UNet with a non-trivial adapter: random A and B, r=4, alpha=8 (alpha != r)."""
    unet = ModelFolder(tiny_mlx_dir).unet()
    inject_lora(unet, LoRAConfig(r=4, alpha=8))
    _randomize(unet, 1)
    return unet


@pytest.mark.slow
def test_sd15_trainable_count_matches_peft():
    unet = UNet2DConditionModel(UNetConfig.from_diffusers(read_json(SD15 / "unet" / "config.json")))
    paths = inject_lora(unet, LoRAConfig(r=8, alpha=16))
    assert len(paths) == 128
    assert trainable_count(unet) == 1_594_368


def test_injection_targets_and_freezing(tiny_unet):
    paths = inject_lora(tiny_unet, LoRAConfig(r=4, alpha=8))
    assert all(p.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or p.endswith("to_out.0") for p in paths)
    assert all(".transformer_blocks." in p for p in paths)
    from mlx.utils import tree_flatten

    names = [k for k, _ in tree_flatten(tiny_unet.trainable_parameters())]
    assert names and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in names)
    assert len(names) == 2 * len(paths)


def test_fresh_adapter_changes_nothing(tiny_unet):
    x, t, ctx = _inputs()
    before = _mlx_out(tiny_unet, x, t, ctx)
    inject_lora(tiny_unet, LoRAConfig(r=4, alpha=8))
    assert np.array_equal(_mlx_out(tiny_unet, x, t, ctx), before)


def test_fused_equals_unfused(trained_like):
    x, t, ctx = _inputs()
    unfused = _mlx_out(trained_like, x, t, ctx)
    assert fuse_lora(trained_like) > 0 and not lora_layers(trained_like)
    assert rel_err(_mlx_out(trained_like, x, t, ctx), unfused) <= 1e-5


def test_round_trip_is_exact(trained_like, tmp_path):
    adapter = adapter_from_model(trained_like, {"steps": 7, "base_model": "tiny"})
    export_adapter(adapter, tmp_path)
    for name in (PEFT_WEIGHTS, DIFFUSERS_WEIGHTS, KOHYA_WEIGHTS):
        back = resolve(load_adapter(tmp_path / name), trained_like)
        assert set(back.A) == set(adapter.A), name
        for k in adapter.A:
            assert mx.array_equal(back.A[k], adapter.A[k]).item() and mx.array_equal(back.B[k], adapter.B[k]).item()
            assert back.alpha[k] == 8.0
    assert load_adapter(tmp_path).metadata["steps"] == 7  # folder -> PEFT files


def _torch_pipe(diffusers_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(diffusers_dir), safety_checker=None)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_diffusers_loads_our_files(fmt, trained_like, tiny_diffusers_dir, tmp_path):
    export_adapter(adapter_from_model(trained_like), tmp_path)
    pipe = _torch_pipe(tiny_diffusers_dir)
    weight = DIFFUSERS_WEIGHTS if fmt == "diffusers" else KOHYA_WEIGHTS
    pipe.load_lora_weights(str(tmp_path), weight_name=weight)
    x, t, ctx = _inputs()
    base = _torch_out(_torch_pipe(tiny_diffusers_dir).unet, x, t, ctx)
    ours = _mlx_out(trained_like, x, t, ctx)
    theirs = _torch_out(pipe.unet, x, t, ctx)
    assert rel_err(ours, base) > 1e-2  # the adapter really changes the output
    assert rel_err(ours, theirs) <= TOL


def test_peft_loads_our_folder(trained_like, tiny_diffusers_dir, tmp_path):
    from diffusers import UNet2DConditionModel as TorchUNet
    from peft import PeftModel

    export_adapter(adapter_from_model(trained_like), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and set(cfg["target_modules"]) == {"to_q", "to_k", "to_v",
                                                                                       "to_out.0"}
    peft_unet = PeftModel.from_pretrained(TorchUNet.from_pretrained(str(tiny_diffusers_dir / "unet")),
                                          str(tmp_path)).eval()
    x, t, ctx = _inputs()
    assert rel_err(_mlx_out(trained_like, x, t, ctx), _torch_out(peft_unet, x, t, ctx)) <= TOL


def test_import_and_stack_adapters_like_diffusers(trained_like, tiny_diffusers_dir, tiny_mlx_dir, tmp_path):
    """Two adapters applied with per-adapter scales == diffusers' set_adapters with weights."""
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    export_adapter(adapter_from_model(trained_like), a_dir)
    _randomize(trained_like, 2)
    export_adapter(adapter_from_model(trained_like), b_dir)
    pipe = _torch_pipe(tiny_diffusers_dir)
    pipe.load_lora_weights(str(a_dir), weight_name=DIFFUSERS_WEIGHTS, adapter_name="a")
    pipe.load_lora_weights(str(b_dir), weight_name=KOHYA_WEIGHTS, adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.5, 1.25])
    unet = ModelFolder(tiny_mlx_dir).unet()
    apply_adapter(unet, load_adapter(a_dir / DIFFUSERS_WEIGHTS), scale=0.5)
    apply_adapter(unet, load_adapter(b_dir / KOHYA_WEIGHTS), scale=1.25)
    x, t, ctx = _inputs()
    assert rel_err(_mlx_out(unet, x, t, ctx), _torch_out(pipe.unet, x, t, ctx)) <= TOL


def test_old_diffusers_naming_imports(trained_like, tiny_mlx_dir, tmp_path):
    adapter = adapter_from_model(trained_like)
    old = {}
    for k in adapter.A:
        old[f"unet.{k}.lora.down.weight"] = adapter.A[k]
        old[f"unet.{k}.lora.up.weight"] = adapter.B[k]
    mx.save_safetensors(str(tmp_path / "old.safetensors"), old)
    # Older files carry no alpha: diffusers then uses alpha = r; our loader does the same.
    loaded = load_adapter(tmp_path / "old.safetensors")
    assert all(loaded.alpha[k] == 4.0 for k in loaded.A)
    unet = ModelFolder(tiny_mlx_dir).unet()
    apply_adapter(unet, loaded, scale=2.0)  # alpha/r = 1 here, x2 = the trained scale of 8/4
    x, t, ctx = _inputs()
    assert rel_err(_mlx_out(unet, x, t, ctx), _mlx_out(trained_like, x, t, ctx)) <= 1e-5


def test_foreign_adapter_is_refused_with_every_key(trained_like, tiny_mlx_dir, tmp_path):
    adapter = adapter_from_model(trained_like)
    t = {}
    for k in adapter.A:
        t[f"unet.{k}.lora_A.weight"] = adapter.A[k]
        t[f"unet.{k}.lora_B.weight"] = adapter.B[k]
    k0 = sorted(adapter.A)[0]
    t["unet.down_blocks.9.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"] = adapter.A[k0]
    t["unet.down_blocks.9.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"] = adapter.B[k0]
    t[f"unet.{k0}.lora_A.weight"] = mx.zeros((4, 7))
    mx.save_safetensors(str(tmp_path / "foreign.safetensors"), t)
    unet = ModelFolder(tiny_mlx_dir).unet()
    before = np.array(unet.conv_in.weight)
    with pytest.raises(AdapterError) as e:
        apply_adapter(unet, load_adapter(tmp_path / "foreign.safetensors"))
    msg = str(e.value)
    assert "no such module: down_blocks.9.attentions.0.transformer_blocks.0.attn1.to_q" in msg
    assert f"wrong shape: {k0}" in msg
    assert np.array_equal(np.array(unet.conv_in.weight), before)

    mx.save_safetensors(str(tmp_path / "te.safetensors"),
                        {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": mx.zeros((4, 4))})
    with pytest.raises(AdapterError, match="not a text-encoder LoRA in a known format:\n  down/A without up/B"):
        load_adapter(tmp_path / "te.safetensors")


def test_continue_training_from_adapter(trained_like, tiny_mlx_dir, tmp_path):
    export_adapter(adapter_from_model(trained_like), tmp_path, formats=("kohya",))
    unet = ModelFolder(tiny_mlx_dir).unet()
    inject_lora(unet, LoRAConfig(r=4, alpha=8))
    load_into_lora_layers(unet, load_adapter(tmp_path / KOHYA_WEIGHTS))
    x, t, ctx = _inputs()
    assert np.array_equal(_mlx_out(unet, x, t, ctx), _mlx_out(trained_like, x, t, ctx))
    other = ModelFolder(tiny_mlx_dir).unet()
    inject_lora(other, LoRAConfig(r=2, alpha=8))
    with pytest.raises(AdapterError, match="rank/alpha mismatch"):
        load_into_lora_layers(other, load_adapter(tmp_path / KOHYA_WEIGHTS))


def test_save_fused_model_folder(trained_like, tiny_mlx_dir, tmp_path):
    x, t, ctx = _inputs()
    want = _mlx_out(trained_like, x, t, ctx)
    out = save_fused_model(tiny_mlx_dir, trained_like, tmp_path / "fused")
    fused = ModelFolder(out).unet()
    assert rel_err(_mlx_out(fused, x, t, ctx), want) <= 1e-5
    for comp in ("text_encoder", "vae"):  # copied unchanged: only the UNet has the adapter in it
        got, want = out / comp / "model.safetensors", tiny_mlx_dir / comp / "model.safetensors"
        assert got.read_bytes() == want.read_bytes()
    assert ModelFolder(out).info["fused_from"] == str(ModelFolder(tiny_mlx_dir).path)
