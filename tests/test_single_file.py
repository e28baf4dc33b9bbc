"""Original single-file checkpoints (LDM layout) in and out.

The export is judged by diffusers' own single-file loader; the import by equality with the
diffusers-folder import of the same weights. Full SD1.5 shapes (random weights) run both ways
in subprocesses whose peak memory is printed (`pytest -s`).
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import convert.single_file as sf
from convert.__main__ import main as convert_main
from convert.layout import COMPONENTS
from convert.ldm import LDMKeyError, diffusers_to_ldm, ldm_to_diffusers, select_unet_weights
from fixtures import rel_err
from mlx_sd.model_folder import ModelFolder

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5




def _mlx_weights(folder: Path) -> dict[str, dict[str, mx.array]]:
    return {c: mx.load(str(folder / c / "model.safetensors")) for c in COMPONENTS}


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _mlx_weights(a), _mlx_weights(b)
    for c in COMPONENTS:
        assert set(wa[c]) == set(wb[c]), c
        for k in wa[c]:
            assert wa[c][k].dtype == wb[c][k].dtype and mx.array_equal(wa[c][k], wb[c][k]).item(), f"{c}: {k}"


@pytest.fixture(scope="module")
def exported(tiny_mlx_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "tiny-sd15.safetensors"
    assert convert_main(["--to-single-file", str(tiny_mlx_dir), str(out)]) == 0
    return out


def _save_state(state: dict, path: Path) -> Path:
    mx.save_safetensors(str(path), state)
    return path


# --- the export, judged by diffusers ---------------------------------------------------------


def test_export_loads_in_diffusers_with_equal_outputs(exported, tiny_diffusers_dir):
    import torch
    from diffusers import StableDiffusionPipeline

    ours = StableDiffusionPipeline.from_single_file(str(exported), config=str(tiny_diffusers_dir),
                                                    local_files_only=True)
    ref = StableDiffusionPipeline.from_pretrained(tiny_diffusers_dir)
    for comp in COMPONENTS:  # every parameter placed, none left at its init
        a, b = getattr(ours, comp).state_dict(), getattr(ref, comp).state_dict()
        assert set(a) == set(b), comp
        assert all(torch.equal(a[k], b[k]) for k in b), comp

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 77, 32, generator=g)
    img = torch.randn(1, 3, 64, 64, generator=g)
    ids = torch.randint(0, ref.text_encoder.config.vocab_size - 2, (2, 77), generator=g)
    errs = {}
    with torch.no_grad():
        t = torch.tensor([10, 800])
        errs["unet"] = rel_err(ours.unet(x, t, ctx).sample, ref.unet(x, t, ctx).sample)
        errs["vae.encode"] = rel_err(ours.vae.encode(img).latent_dist.mean, ref.vae.encode(img).latent_dist.mean)
        errs["vae.decode"] = rel_err(ours.vae.decode(x[:1]).sample, ref.vae.decode(x[:1]).sample)
        errs["text_encoder"] = rel_err(ours.text_encoder(ids).last_hidden_state,
                                       ref.text_encoder(ids).last_hidden_state)
    print(f"\nfrom_single_file(our export) vs from_pretrained, relative max error: {errs}")
    assert all(e <= TOL for e in errs.values()), errs


def test_export_has_the_published_layout(exported):
    state = mx.load(str(exported))
    keys = set(state)
    # Names fixed by the published SD1.5 file (the tiny UNet has SD1.5's block structure).
    for k in ("model.diffusion_model.input_blocks.3.0.op.weight",            # first downsampler
              "model.diffusion_model.output_blocks.2.1.conv.weight",         # upsampler, block without attention
              "model.diffusion_model.output_blocks.5.2.conv.weight",         # upsampler after an attention
              "model.diffusion_model.middle_block.1.proj_in.weight",
              "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
              "model.diffusion_model.time_embed.2.weight", "model.diffusion_model.out.2.bias",
              "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight",  # diffusers up_blocks.2: LDM counts upward
              "first_stage_model.encoder.mid.attn_1.proj_out.weight", "first_stage_model.encoder.norm_out.bias",
              "cond_stage_model.transformer.text_model.final_layer_norm.weight",
              "cond_stage_model.transformer.text_model.embeddings.position_ids"):
        assert k in keys, k
    assert not any(k.startswith(("model.diffusion_model.down_blocks",
                                 "first_stage_model.encoder.down_blocks")) for k in keys)
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)  # 1x1 conv in LDM
    assert state["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape == (32, 32, 1, 1)
    assert state["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == mx.int64


def test_pure_mapping_round_trips(exported):
    state = mx.load(str(exported))
    comps = ldm_to_diffusers(state)
    back = diffusers_to_ldm(comps)
    assert set(back) == set(state)
    assert all(mx.array_equal(back[k], state[k]).item() and back[k].shape == state[k].shape for k in state)
    # The VAE mid-block attention comes out as diffusers' Linear weights.
    assert comps["vae"]["decoder.mid_block.attentions.0.to_out.0.weight"].shape == (64, 64)
    # Nothing is dropped silently: keys with no place are all named.
    extra = {"model.diffusion_model.input_blocks.1.2.weight": mx.zeros(1),
             "first_stage_model.encoder.foo.weight": mx.zeros(1)}
    with pytest.raises(LDMKeyError) as e:
        ldm_to_diffusers({**state, **extra})
    assert e.value.keys == sorted(extra)


# --- the import --------------------------------------------------------------------------------


def test_import_equals_diffusers_folder_import(exported, tiny_diffusers_dir, tiny_mlx_dir, tmp_path, capsys):
    out = tmp_path / "from-single"
    assert convert_main([str(exported), str(out), "--config", str(tiny_diffusers_dir)]) == 0
    _assert_same_weights(out, tiny_mlx_dir)
    info = ModelFolder(out).info
    assert info["single_file"]["unet_weights"] == "only" and info["single_file"]["file"] == exported.name
    assert "only UNet weights" in capsys.readouterr().out
    for sub in ("tokenizer/vocab.json", "scheduler/scheduler_config.json", "unet/config.json"):
        assert (out / sub).read_bytes() == (tiny_diffusers_dir / sub).read_bytes()
    # A converted folder serves as --config too.
    again = tmp_path / "from-single-2"
    assert convert_main([str(exported), str(again), "--config", str(tiny_mlx_dir)]) == 0
    _assert_same_weights(again, tiny_mlx_dir)


def test_default_configs_are_sd15(exported, tmp_path, capsys):
    # The tiny file against the bundled SD1.5 configs: every mismatch named, nothing written.
    assert convert_main([str(exported), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "does not match" in err and " missing:" in err and " wrong shape:" in err
    key = "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"
    assert f"{key}: file (77, 32) vs model (77, 768)" in err
    assert "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.bias" in err  # SD1.5 has 12 layers
    assert not (tmp_path / "o").exists()


def test_ema_weights_preferred_and_recorded(exported, tiny_diffusers_dir, tiny_mlx_dir, tmp_path, capsys):
    state = mx.load(str(exported))
    # LitEma's names: dots removed after `model_ema.`; values differ so the choice shows.
    ema = {"model_ema." + "".join(k.split(".")[1:]): v + 1 for k,
           v in state.items() if k.startswith("model.diffusion_model.")}
    ema["model_ema.decay"], ema["model_ema.num_updates"] = mx.array(0.9999), mx.array(1000, dtype=mx.int32)
    both = _save_state({**state, **ema, "alphas_cumprod": mx.ones((1000,))}, tmp_path / "both.safetensors")

    out = tmp_path / "ema"
    assert convert_main([str(both), str(out), "--config", str(tiny_diffusers_dir)]) == 0
    assert "EMA weights" in capsys.readouterr().out
    assert ModelFolder(out).info["single_file"]["unet_weights"] == "ema"
    got, base = _mlx_weights(out), _mlx_weights(tiny_mlx_dir)
    assert all(mx.array_equal(got["unet"][k], base["unet"][k] + 1).item() for k in base["unet"])
    assert all(mx.array_equal(got["vae"][k], base["vae"][k]).item() for k in base["vae"])

    out2 = tmp_path / "non-ema"
    assert convert_main([str(both), str(out2), "--config", str(tiny_diffusers_dir), "--non-ema"]) == 0
    assert ModelFolder(out2).info["single_file"]["unet_weights"] == "non-ema"
    _assert_same_weights(out2, tiny_mlx_dir)
    assert select_unet_weights(state)[1] == "only"

    gap = "model_ema.diffusion_modelout2bias"
    partial = _save_state({**state, **{k: v for k, v in ema.items() if k != gap}}, tmp_path / "partial.safetensors")
    assert convert_main([str(partial), str(tmp_path / "o"), "--config", str(tiny_diffusers_dir)]) == 2
    err = capsys.readouterr().err
    assert "EMA weights incomplete" in err and gap in err and "--non-ema" in err


def test_missing_extra_and_misshaped_keys_are_listed(exported, tiny_diffusers_dir, tmp_path, capsys):
    state = dict(mx.load(str(exported)))
    state.pop("model.diffusion_model.output_blocks.5.2.conv.bias")
    state.pop("first_stage_model.decoder.mid.attn_1.k.weight")
    state["model.diffusion_model.input_blocks.1.1.lora_thing.weight"] = mx.zeros((2,))
    state["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = mx.zeros((5,))
    bad = _save_state(state, tmp_path / "bad.safetensors")
    assert convert_main([str(bad), str(tmp_path / "o"), "--config", str(tiny_diffusers_dir)]) == 2
    err = capsys.readouterr().err
    assert "2 missing" in err and "model.diffusion_model.output_blocks.5.2.conv.bias" in err
    assert "first_stage_model.decoder.mid.attn_1.k.weight" in err
    assert "1 unexpected" in err and "model.diffusion_model.input_blocks.1.1.lora_thing.weight" in err
    assert "1 wrong shape" in err and "final_layer_norm.weight: file (5,) vs model (32,)" in err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


# --- other architectures are named, not half-converted ------------------------------------------


def _fake(keys: dict[str, tuple]) -> dict:
    return {k: mx.zeros(shape) for k, shape in keys.items()}


ARCHS = {
    "sdxl": ({"conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 8),
              "conditioner.embedders.1.model.positional_embedding": (77, 8),
              "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
              "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (8, 2048),
              "first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3)},
             "Stable Diffusion XL"),
    "sd2": ({"cond_stage_model.model.token_embedding.weight": (10, 8),
             "cond_stage_model.model.positional_embedding": (77, 8),
             "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
             "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 1024),
             "first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3)},
            "Stable Diffusion 2.x"),
    "inpainting": ({"cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 8),
                    "model.diffusion_model.input_blocks.0.0.weight": (8, 9, 3, 3),
                    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 768),
                    "first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3)},
                   "inpainting model (9 input channels"),
    "lora": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 8)}, "a LoRA adapter"),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_other_architectures_are_named(arch, tmp_path, capsys):
    keys, name = ARCHS[arch]
    f = _save_state(_fake(keys), tmp_path / f"{arch}.safetensors")
    assert convert_main([str(f), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert name in err and "Only Stable Diffusion 1.x" in err, err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


# --- pickle checkpoints ----------------------------------------------------------------------------


class NotATensor:  # what a trainer's pickled callback object looks like to weights_only loading
    pass


def _ckpt(exported: Path, path: Path, **extra) -> Path:
    import torch

    state = {k: torch.from_numpy(np.array(v)) for k, v in mx.load(str(exported)).items()}
    torch.save({"state_dict": state, "global_step": 470000, **extra}, path)
    return path


def test_ckpt_needs_allow_pickle(exported, tiny_diffusers_dir, tiny_mlx_dir, tmp_path, capsys):
    ckpt = _ckpt(exported, tmp_path / "tiny.ckpt")
    assert convert_main([str(ckpt), str(tmp_path / "refused"), "--config", str(tiny_diffusers_dir)]) == 2
    err = capsys.readouterr().err
    assert "pickle" in err and "--allow-pickle" in err and ".safetensors" in err
    assert not (tmp_path / "refused").exists()

    out = tmp_path / "from-ckpt"
    assert convert_main([str(ckpt), str(out), "--config", str(tiny_diffusers_dir), "--allow-pickle"]) == 0
    _assert_same_weights(out, tiny_mlx_dir)


class RunsCode:  # what a malicious pickle looks like: unpickling it would call os.system
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_ckpt_with_python_objects_converts_without_running_them(exported, tiny_diffusers_dir, tiny_mlx_dir,
                                                                tmp_path):
    marker = tmp_path / "code-ran"
    ckpt = _ckpt(exported, tmp_path / "callbacks.ckpt", callbacks=NotATensor(), payload=RunsCode(marker))
    out = tmp_path / "o"
    assert convert_main([str(ckpt), str(out), "--config", str(tiny_diffusers_dir), "--allow-pickle"]) == 0
    assert not marker.exists()
    _assert_same_weights(out, tiny_mlx_dir)


def test_ckpt_without_torch_converts(exported, tiny_diffusers_dir, tiny_mlx_dir, tmp_path, monkeypatch):
    ckpt = _ckpt(exported, tmp_path / "tiny.ckpt")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    out = tmp_path / "o"
    assert convert_main([str(ckpt), str(out), "--config", str(tiny_diffusers_dir), "--allow-pickle"]) == 0
    _assert_same_weights(out, tiny_mlx_dir)


def test_safetensors_paths_never_import_torch(exported, tiny_diffusers_dir, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        import mlx_sd
        from convert.__main__ import main
        assert main([{str(exported)!r}, {str(tmp_path / 'm')!r}, "--config", {str(tiny_diffusers_dir)!r}]) == 0
        assert main(["--to-single-file", {str(tmp_path / 'm')!r}, {str(tmp_path / 'x.safetensors')!r}]) == 0
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers")))
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


# --- the Hub path ------------------------------------------------------------------------------


def test_hub_repo_and_filename(exported, tiny_diffusers_dir, tiny_mlx_dir, tmp_path, monkeypatch):
    calls = []

    def fake_download(repo_id, filename, revision=None):
        calls.append((repo_id, filename, revision))
        return str(exported)

    monkeypatch.setattr(sf, "hf_hub_download", fake_download)
    out = tmp_path / "hub"
    assert convert_main(["someone/tiny-sd", str(out), "--filename", "tiny-pruned-emaonly.safetensors",
                         "--config", str(tiny_diffusers_dir), "--revision", "main"]) == 0
    assert calls == [("someone/tiny-sd", "tiny-pruned-emaonly.safetensors", "main")]
    _assert_same_weights(out, tiny_mlx_dir)
    assert ModelFolder(out).info["source"] == "someone/tiny-sd"
    assert ModelFolder(out).info["single_file"]["file"] == "tiny-pruned-emaonly.safetensors"

    assert convert_main(["someone/tiny-sd", str(tmp_path / "o2"), "--filename", "v1-5-pruned.ckpt"]) == 2
    assert len(calls) == 1  # refused before any download


# --- export details ---------------------------------------------------------------------------------


def test_fused_lora_model_exports_and_diffusers_sees_the_lora(tiny_mlx_dir, tiny_diffusers_dir, tmp_path):
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    from lora.export import save_fused_model
    from lora.layers import LoRAConfig, inject_lora, lora_layers

    unet = ModelFolder(tiny_mlx_dir).unet()
    inject_lora(unet, LoRAConfig(r=4, alpha=8))
    mx.random.seed(3)
    for layer in lora_layers(unet).values():
        layer.lora_B.weight = mx.random.normal(layer.lora_B.weight.shape) * 0.1
    fused = save_fused_model(tiny_mlx_dir, unet, tmp_path / "fused")
    f = tmp_path / "fused.safetensors"
    assert convert_main(["--to-single-file", str(fused), str(f)]) == 0

    theirs = TorchUNet.from_single_file(str(f), config=str(tiny_diffusers_dir), subfolder="unet", local_files_only=True)
    base = TorchUNet.from_pretrained(tiny_diffusers_dir, subfolder="unet")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16, 16, 4)).astype(np.float32)
    ctx = rng.standard_normal((1, 77, 32)).astype(np.float32)
    mlx_out = np.array(ModelFolder(fused).unet()(mx.array(x), mx.array([10]), mx.array(ctx)))
    with torch.no_grad():
        args = (torch.from_numpy(x).permute(0, 3, 1, 2), torch.tensor([10]), torch.from_numpy(ctx))
        t_out = theirs(*args).sample.permute(0, 2, 3, 1).numpy()
        b_out = base(*args).sample.permute(0, 2, 3, 1).numpy()
    err = rel_err(t_out, mlx_out)
    print(f"\nfused LoRA: diffusers(from_single_file) vs MLX fused UNet, relative max error {err:.2e}; "
          f"LoRA effect vs base {rel_err(b_out, mlx_out):.2e}")
    assert err <= 1e-4
    assert rel_err(b_out, mlx_out) > 1e-2  # the LoRA is really in the file


def test_export_refuses_to_overwrite_and_is_atomic(tiny_mlx_dir, tmp_path, monkeypatch, capsys):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"user file")
    assert convert_main(["--to-single-file", str(tiny_mlx_dir), str(f)]) == 2
    assert "--force" in capsys.readouterr().err and f.read_bytes() == b"user file"
    assert convert_main(["--to-single-file", str(tiny_mlx_dir), str(tmp_path / "model.ckpt")]) == 2
    assert ".safetensors" in capsys.readouterr().err

    def crash(path, *a, **k):
        Path(path).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(sf.mx, "save_safetensors", crash)
    with pytest.raises(KeyboardInterrupt):
        convert_main(["--to-single-file", str(tiny_mlx_dir), str(f), "--force"])
    assert f.read_bytes() == b"user file" and sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_export_float16(tiny_mlx_dir, tmp_path):
    f = tmp_path / "half.safetensors"
    assert convert_main(["--to-single-file", str(tiny_mlx_dir), str(f), "--dtype", "float16"]) == 0
    state = mx.load(str(f))
    assert state["model.diffusion_model.out.2.weight"].dtype == mx.float16
    assert state["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == mx.int64


# --- full SD1.5 shape, both ways, with the memory it takes ----------------------------------------------

_MAKE_SD15 = """
import json, sys
import mlx_sd, mlx.core as mx
from mlx.utils import tree_flatten
from convert.layout import COMPONENTS, mlx_to_diffusers
from mlx_sd.model_folder import build_component
from convert.ldm import diffusers_to_ldm
from mlx_sd.configs import SD15
mx.random.seed(0)
comps = {}
for c in COMPONENTS:  # MLX's lazy init: random weights of the real shapes, made as they are written
    cfg = json.loads((SD15 / c / "config.json").read_text())
    comps[c] = mlx_to_diffusers(c, dict(tree_flatten(build_component(c, cfg).parameters())), cfg)
mx.save_safetensors(sys.argv[1], diffusers_to_ldm(comps))
"""

_MEASURE = """
import json, sys, time
import mlx_sd, mlx.core as mx
from convert.__main__ import main
from benchmarks.rss import peak_rss_bytes
t = time.time()
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "s": round(time.time() - t, 1),
                  "ru_maxrss_gb": round(peak_rss_bytes() / 2**30, 2),
                  "mx_peak_gb": round(mx.get_peak_memory() / 2**30, 2)}))
"""


def _measure(*args) -> dict:
    r = subprocess.run([sys.executable, "-c", _MEASURE, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_full_sd15_shape_both_ways_within_mac_memory(tmp_path):
    try:
        src = tmp_path / "sd15-random.safetensors"
        r = subprocess.run([sys.executable, "-c", _MAKE_SD15, str(src)], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        size_gb = src.stat().st_size / 2**30

        into = _measure(src, tmp_path / "mlx")  # the bundled SD1.5 configs, as a user would run it
        back = tmp_path / "back.safetensors"
        out = _measure("--to-single-file", tmp_path / "mlx", back)
        print(f"\nfull SD1.5 shape ({size_gb:.2f} GiB file): import {into}; export {out} (GiB, seconds; peak RSS)")
        assert into["rc"] == 0 and out["rc"] == 0

        orig, again = mx.load(str(src)), mx.load(str(back))
        assert len(orig) == 686 + 248 + 197 and set(again) == set(orig)  # UNet + VAE + CLIP (with position_ids)
        mlx = _mlx_weights(tmp_path / "mlx")
        for k in ("model.diffusion_model.input_blocks.0.0.weight",
                  "model.diffusion_model.output_blocks.8.2.conv.weight",
                  "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
                  "first_stage_model.decoder.up.3.block.0.conv1.weight",
                  "first_stage_model.encoder.mid.attn_1.v.weight",
                  "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight"):
            assert again[k].shape == orig[k].shape and mx.array_equal(again[k], orig[k]).item(), k
        # ...and the MLX folder holds them in MLX layout under diffusers names.
        assert mx.array_equal(mlx["unet"]["conv_in.weight"],
                              orig["model.diffusion_model.input_blocks.0.0.weight"].transpose(0, 2, 3, 1)).item()
        assert mx.array_equal(mlx["vae"]["decoder.up_blocks.0.resnets.0.conv1.weight"],
                              orig["first_stage_model.decoder.up.3.block.0.conv1.weight"].transpose(0, 2, 3, 1)).item()
        assert mx.array_equal(mlx["vae"]["encoder.mid_block.attentions.0.to_v.weight"],
                              orig["first_stage_model.encoder.mid.attn_1.v.weight"].reshape(512, 512)).item()
        # A 32 GB Mac: the conversion must leave room for the OS and the rest (stated budget 16 GiB).
        for m in (into, out):
            assert m["ru_maxrss_gb"] < 16 and m["mx_peak_gb"] < 16, m
    finally:  # ~12 GB of files; pytest would keep them for its last three runs
        shutil.rmtree(tmp_path, ignore_errors=True)
