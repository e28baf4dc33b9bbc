"""Conversion: key coverage both ways, strict errors, atomic output, the Hub path, bad sources."""

import fnmatch
import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from safetensors.torch import load_file as torch_load

import convert.folder as cf
from convert.__main__ import main as convert_main
from convert.model import convert_pipeline
from convert.layout import COMPONENTS, diffusers_to_mlx, mlx_to_diffusers
from convert.model import resolve_model
from mlx_sd.model_folder import ModelFolder, ModelFolderError, build_component
from mlx_sd.weights import WeightsError, load_strict


def _torch_state(diffusers_dir, comp):
    return {k: mx.array(v.numpy()) for k, v in torch_load(str(cf._weights_path(diffusers_dir, comp)[0])).items()}


@pytest.mark.parametrize("comp", COMPONENTS)
def test_key_coverage_both_ways(comp, tiny_diffusers_dir):
    src = _torch_state(tiny_diffusers_dir, comp)
    config = json.loads((tiny_diffusers_dir / comp / "config.json").read_text())
    converted = diffusers_to_mlx(comp, src)
    model_keys = {k: v.shape for k, v in tree_flatten(build_component(comp, config).parameters())}
    assert set(converted) == set(model_keys)
    assert all(tuple(converted[k].shape) == tuple(model_keys[k]) for k in converted)
    back = mlx_to_diffusers(comp, converted, config)
    src_params = {k: v for k, v in src.items() if not k.endswith("position_ids")}
    if comp == "text_encoder":  # written with the published file's prefix, whatever transformers saved
        src_params = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in src_params.items()}
    assert set(back) == set(src_params)
    for k, v in src_params.items():
        assert back[k].shape == v.shape and mx.array_equal(back[k], v).item(), k


def test_converted_folder_layout(tiny_mlx_dir):
    for comp in COMPONENTS:
        assert (tiny_mlx_dir / comp / "config.json").exists()
        assert (tiny_mlx_dir / comp / "model.safetensors").exists()
    assert (tiny_mlx_dir / "tokenizer" / "vocab.json").exists()
    assert (tiny_mlx_dir / "scheduler" / "scheduler_config.json").exists()
    assert json.loads((tiny_mlx_dir / "mlx_sd.json").read_text())["format"] == "mlx-sd"
    assert not list(tiny_mlx_dir.parent.glob(".*tmp*"))


def test_tampered_weights_list_every_problem(tiny_mlx_dir, tmp_path):
    weights = mx.load(str(tiny_mlx_dir / "text_encoder" / "model.safetensors"))
    weights.pop("text_model.final_layer_norm.bias")
    weights["text_model.extra.weight"] = mx.zeros((2,))
    weights["text_model.embeddings.position_embedding.weight"] = mx.zeros((3, 3))
    bad = tmp_path / "bad.safetensors"
    mx.save_safetensors(str(bad), weights)
    from mlx_sd.clip import CLIPTextModel
    from mlx_sd.config import CLIPTextConfig, read_json

    model = CLIPTextModel(CLIPTextConfig.from_diffusers(read_json(tiny_mlx_dir / "text_encoder" / "config.json")))
    with pytest.raises(WeightsError) as e:
        load_strict(model, bad)
    msg = str(e.value)
    assert str(bad) in msg
    assert "1 missing" in msg and "text_model.final_layer_norm.bias" in msg
    assert "1 unexpected" in msg and "text_model.extra.weight" in msg
    assert "1 wrong shape" in msg and "position_embedding.weight: file (3, 3)" in msg


def test_tampered_source_folder_fails_conversion(tiny_diffusers_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_diffusers_dir, src)
    f = src / "vae" / "diffusion_pytorch_model.safetensors"
    w = mx.load(str(f))
    w.pop("decoder.conv_out.bias")
    mx.save_safetensors(str(f), w)
    out = tmp_path / "out"
    with pytest.raises(WeightsError, match="decoder.conv_out.bias"):
        convert_pipeline(src, out)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp*"))


def test_atomic_output_on_failure(tiny_diffusers_dir, tiny_mlx_dir, tmp_path, monkeypatch):
    out = tmp_path / "model"
    shutil.copytree(tiny_mlx_dir, out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    real = cf.convert_component

    def crash_on_vae(folder, comp, dst, dtype):
        if comp == "vae":
            raise KeyboardInterrupt  # e.g. Ctrl-C half-way
        return real(folder, comp, dst, dtype)

    monkeypatch.setattr(cf, "convert_component", crash_on_vae)
    with pytest.raises(KeyboardInterrupt):
        convert_pipeline(tiny_diffusers_dir, out, force=True)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # old conversion intact
    assert not list(tmp_path.glob(".model.*"))
    with pytest.raises(KeyboardInterrupt):
        convert_pipeline(tiny_diffusers_dir, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_existing_output_needs_force_and_never_replaces_other_folders(tiny_diffusers_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("user data")
    with pytest.raises(cf.ConversionError, match="--force"):
        convert_pipeline(tiny_diffusers_dir, out)
    with pytest.raises(cf.ConversionError, match="not a converted model folder"):
        convert_pipeline(tiny_diffusers_dir, out, force=True)
    assert (out / "notes.txt").read_text() == "user data"


def test_half_written_folder_is_named(tiny_mlx_dir, tmp_path):
    half = tmp_path / "half"
    shutil.copytree(tiny_mlx_dir, half)
    (half / "mlx_sd.json").unlink()
    with pytest.raises(ModelFolderError, match="half-written"):
        ModelFolder(half)


def test_diffusers_folder_given_to_loader_says_convert(tiny_diffusers_dir):
    with pytest.raises(ModelFolderError, match="python -m convert"):
        ModelFolder(tiny_diffusers_dir)


def test_bad_sources_give_clear_messages(tiny_diffusers_dir, tmp_path, capsys):
    not_sd = tmp_path / "notsd"
    not_sd.mkdir()
    (not_sd / "readme.txt").write_text("hi")
    assert convert_main([str(not_sd), str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert "not a complete Stable Diffusion diffusers folder" in err and "unet/ missing" in err

    no_vae = tmp_path / "novae"
    shutil.copytree(tiny_diffusers_dir, no_vae)
    shutil.rmtree(no_vae / "vae")
    assert convert_main([str(no_vae), str(tmp_path / "o2")]) == 2
    assert "vae/ missing" in capsys.readouterr().err

    bin_only = tmp_path / "binonly"
    shutil.copytree(tiny_diffusers_dir, bin_only)
    (bin_only / "unet" / "diffusion_pytorch_model.safetensors").rename(bin_only / "unet" / "diffusion_pytorch_model.bin")
    assert convert_main([str(bin_only), str(tmp_path / "o3")]) == 2
    assert "only .bin (pickle) weights" in capsys.readouterr().err

    sdxl = tmp_path / "sdxl"
    shutil.copytree(tiny_diffusers_dir, sdxl)
    (sdxl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    assert convert_main([str(sdxl), str(tmp_path / "o4")]) == 2
    assert "StableDiffusionXLPipeline" in capsys.readouterr().err

    assert convert_main([str(tmp_path / "nope" / "x"), str(tmp_path / "o5")]) == 2
    assert "not a Hugging Face repo id" in capsys.readouterr().err
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def _fake_hub(repo_dir: Path, calls: list):
    """Stand-ins for the two network calls, serving a local folder as the Hub repo."""
    files = sorted(str(p.relative_to(repo_dir)) for p in repo_dir.rglob("*") if p.is_file())

    def list_repo_files(repo_id, revision=None):
        calls.append(("list", repo_id))
        return files

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append(("download", repo_id, tuple(allow_patterns)))
        dst = repo_dir.parent / "snapshot"
        for f in files:
            if any(fnmatch.fnmatch(f, p) for p in allow_patterns):
                (dst / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(repo_dir / f, dst / f)
        return str(dst)

    return list_repo_files, snapshot_download


def test_hub_repo_id_downloads_only_needed_files(tiny_diffusers_dir, tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "repo"
    shutil.copytree(tiny_diffusers_dir, repo)
    # Files the real repo has that a conversion must not fetch.
    for extra in ("unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.bin",
                  "unet/diffusion_pytorch_model.non_ema.safetensors", "v1-5-pruned.safetensors",
                  "safety_checker/model.safetensors"):
        (repo / extra).parent.mkdir(parents=True, exist_ok=True)
        (repo / extra).write_bytes(b"x" * 10)
    calls = []
    lister, downloader = _fake_hub(repo, calls)
    monkeypatch.setattr(cf, "list_repo_files", lister)
    monkeypatch.setattr(cf, "snapshot_download", downloader)
    out = convert_pipeline("someone/tiny-sd", tmp_path / "out")
    assert [c[0] for c in calls] == ["list", "download"]
    fetched = sorted(str(p.relative_to(tmp_path / "hub" / "snapshot")) for p in (tmp_path / "hub" / "snapshot").rglob("*") if p.is_file())
    assert not any(("fp16" in f or f.endswith(".bin") or "non_ema" in f or "pruned" in f or "safety" in f) for f in fetched)
    assert ModelFolder(out).info["source"] == "someone/tiny-sd"
    for comp in COMPONENTS:
        a = mx.load(str(out / comp / "model.safetensors"))
        assert len(a) > 0


def test_hub_bin_only_repo_is_refused_before_download(tiny_diffusers_dir, tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "repo"
    shutil.copytree(tiny_diffusers_dir, repo)
    (repo / "text_encoder" / "model.safetensors").rename(repo / "text_encoder" / "pytorch_model.bin")
    calls = []
    lister, downloader = _fake_hub(repo, calls)
    monkeypatch.setattr(cf, "list_repo_files", lister)
    monkeypatch.setattr(cf, "snapshot_download", downloader)
    with pytest.raises(cf.ConversionError, match="text_encoder: only PyTorch .bin weights"):
        convert_pipeline("someone/old-sd", tmp_path / "out")
    assert [c[0] for c in calls] == ["list"]


def test_resolve_model_converts_once_into_cache(tiny_diffusers_dir, tmp_path):
    first = resolve_model(tiny_diffusers_dir, cache_dir=tmp_path)
    stamp = (first / "mlx_sd.json").stat().st_mtime_ns
    again = resolve_model(tiny_diffusers_dir, cache_dir=tmp_path)
    assert again == first and (first / "mlx_sd.json").stat().st_mtime_ns == stamp
    assert resolve_model(first) == first
