"""Text-encoder LoRA: MLX CLIP + LoRA vs PEFT on transformers' CLIPTextModel, our files in diffusers
(`load_lora_weights`, its kohya loader) and PEFT, import by `--lora`, and training with it.

Every parity figure is fixtures.rel_err, float32, tolerance 1e-4.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
from test_lora import _randomize as randomize_lora
import torch

from fixtures import rel_err
from lora import TEXT_ENCODER_ALLOWED, LoRAConfig, inject_lora, lora_layers, text_encoder_predicate
from lora.export import export_adapter
from lora.formats import (
    DIFFUSERS_WEIGHTS,
    KOHYA_WEIGHTS,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    TEXT_ENCODER_DIR,
    AdapterError,
    adapter_from_model,
    apply_adapter,
    load_adapter,
    load_into_lora_layers,
)
from mlx_sd.model_folder import ModelFolder

TOL = 1e-4
PROMPTS = ["a product photo of black casual shoes on white background", "blue sneakers", ""]


def _randomize(model, seed):
    randomize_lora(model, seed, scale=0.2)


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
    print(f"PEFT CLIPTextModel, targets {' '.join(targets)}: embeddings rel_err {rel_err(ours, want):.2e} "
          f"(LoRA moves them by {rel_err(ours, base):.2e})")
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
    print(f"diffusers load_lora_weights, {fmt} file: embeddings rel_err {rel_err(ctx, want_ctx):.2e}, "
          f"UNet output {rel_err(out, want_out):.2e} (LoRA moves the embeddings by {rel_err(ctx, base_ctx):.2e})")
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
    print(f"PEFT folders (UNet + text_encoder/): embeddings rel_err {rel_err(ctx, want_ctx):.2e}, "
          f"UNet output {rel_err(out, want_out):.2e}")
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


# ----------------------------------------------------------------------------- training


def test_step_clips_both_and_uses_the_text_encoder_lr(tiny_mlx_dir):
    """One update: the reported norm is the global norm over UNet and text-encoder gradients (clipping
    covers both), and each adapter moves at its own peak LR (UNet 1e-2, text encoder 1e-8)."""
    from mlx.utils import tree_flatten

    from mlx_sd.schedulers import NoiseSchedule
    from mlx_sd.training import LoRAModels, LossConfig, TrainStep, loss_fn, make_optimizer

    folder = ModelFolder(tiny_mlx_dir)
    schedule = NoiseSchedule(folder.scheduler_config())
    mx.random.seed(0)
    unet, te = folder.unet(), folder.text_encoder()
    inject_lora(unet, LoRAConfig(r=4, alpha=8))
    inject_lora(te, LoRAConfig(r=4, alpha=8), text_encoder_predicate(("q_proj", "v_proj")))
    _randomize(te, 4)  # non-zero B: every text-encoder parameter gets a gradient
    b_te = {p: np.array(layer.lora_B.weight) for p, layer in lora_layers(te).items()}
    rng = np.random.default_rng(0)
    mean = mx.array(rng.standard_normal((2, 16, 16, 4)).astype(np.float32))
    ids = mx.array(folder.tokenizer()(PROMPTS[:2]))
    noise, t = mx.array(rng.standard_normal((2, 16, 16, 4)).astype(np.float32)), mx.array([100, 700])

    def draw(latents, keys):
        return noise, t

    want_loss, want_grads = nn_value_and_grad(LoRAModels(unet, te), lambda m: loss_fn(
        m.unet, mean, m.text_encoder(ids), noise, t, schedule))
    want_norm = float(np.sqrt(sum(float(mx.sum(g * g)) for _, g in tree_flatten(want_grads))))
    step = TrainStep(unet, make_optimizer(1e-2, "constant", 0, 10), schedule, LossConfig(), max_grad_norm=1e-3,
                     draw=draw, sample=lambda m, s, k: m, text_encoder=te,
                     text_optimizer=make_optimizer(1e-8, "constant", 0, 10))
    loss, acc = step.grad_step(mean, mx.zeros_like(mean), ids, mx.zeros((2, 2), mx.uint32), step.zero_grads())
    assert set(acc) == {"unet", "text_encoder"}
    norm = step.apply_update(acc)
    mx.eval(step.trained_state(), norm)
    assert abs(float(loss) - float(want_loss)) <= 1e-5 * abs(float(want_loss))
    assert abs(float(norm) - want_norm) <= 1e-4 * want_norm and want_norm > 1e-3  # clipping is active
    moved_te = max(np.abs(np.array(layer.lora_B.weight) - b_te[p]).max() for p, layer in lora_layers(te).items())
    moved_unet = max(np.abs(np.array(layer.lora_B.weight)).max() for layer in lora_layers(unet).values())
    assert moved_unet > 1e-3  # AdamW's first step is ~lr per entry
    assert 0 < moved_te <= 2e-8


def nn_value_and_grad(model, f):
    import mlx.nn as nn

    return nn.value_and_grad(model, lambda m: f(m))(model)


def _run(*args):
    import train

    return train.main([str(a) for a in args] + ["--no_progress"])


SETTINGS = ["--resolution", 128, "--gradient_accumulation_steps", 2, "--random_flip",
            "--lr_scheduler", "cosine", "--lr_warmup_steps", 1, "--learning_rate", 1e-3, "--text_encoder_lr", 5e-4,
            "--lora_rank", 4, "--lora_alpha", 8, "--lora_dropout", 0.1, "--no_validation", "--seed", 5,
            "--train_text_encoder", "--text_encoder_targets", "q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
TRAIN = ["--train_batch_size", 2, *SETTINGS]


@pytest.fixture(scope="module")
def te_dataset(tmp_path_factory):
    from test_training import make_dataset

    return make_dataset(tmp_path_factory.mktemp("te") / "data", n=4)


@pytest.fixture(scope="module")
def te_straight(tiny_mlx_dir, te_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("te_straight") / "run"
    assert _run("--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", te_dataset, "--output_dir", out,
                "--max_train_steps", 4, "--checkpointing_steps", 2, *TRAIN) == 0
    return out


def _adapter_arrays(path):
    a = load_adapter(path)
    parts = {"unet": a, "text_encoder": a.text_encoder}
    return {f"{n}:{k}:{w}": np.array(getattr(p, w)[k]) for n, p in parts.items() for k in p.A for w in ("A", "B")}


def _metrics(out):
    logs = sorted((out / "logs").iterdir())[-1]
    return [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]


def test_training_trains_both_adapters(te_straight, tiny_mlx_dir, capsys):
    losses = [r["loss"] for r in _metrics(te_straight)]
    assert len(losses) == 4 and all(np.isfinite(losses))
    adapter = load_adapter(te_straight / "lora_weights")
    te = adapter.text_encoder
    assert te is not None and len(te.A) == 5 * 2  # 5 targets x 2 layers
    assert min(float(mx.abs(b).max()) for b in te.B.values()) > 1e-5  # every text-encoder B left zero
    assert min(float(mx.abs(b).max()) for b in adapter.B.values()) > 1e-5  # and the UNet still trains
    for name in (PEFT_WEIGHTS, f"{TEXT_ENCODER_DIR}/{PEFT_WEIGHTS}", DIFFUSERS_WEIGHTS, KOHYA_WEIGHTS):
        assert (te_straight / "lora_weights" / name).exists(), name
    kohya = mx.load(str(te_straight / "lora_weights" / KOHYA_WEIGHTS), return_metadata=True)
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha" in kohya[0]
    assert kohya[1]["ss_text_encoder_lr"] == "0.0005"
    # The text embeddings are not cached: the cache holds the latents only.
    cache = np.load(next((te_straight / "cache").glob("encoded-*.npz")))
    assert cache["text"].size == 0 and cache["mean"].shape[0] == 4


def test_trainable_counts_are_printed_separately(tiny_mlx_dir, te_dataset, tmp_path, capsys):
    assert _run("--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", te_dataset, "--output_dir",
                tmp_path, "--max_train_steps", 1, "--checkpointing_steps", 0, *TRAIN) == 0
    out = capsys.readouterr().out
    assert "LoRA r=4 alpha=8.0 on to_q, to_k, to_v, to_out.0: 52,480 trainable of" in out
    # 2 layers x (4 attention projections x 4*(32+32) + fc1 4*(32+37)) = 2 x (1024 + 276)
    assert "text-encoder LoRA r=4 alpha=8.0 on q_proj, k_proj, v_proj, out_proj, fc1: 2,600 trainable of" in out


def test_resume_is_exact(te_straight, tiny_mlx_dir, te_dataset, tmp_path):
    """4 updates straight == 2 updates, checkpoint, resume to 4: bit-identical adapters (UNet and text
    encoder) and the same loss and LR at every step (LoRA dropout, flips and accumulation on)."""
    import shutil

    ck = te_straight / "checkpoints" / "checkpoint-2"
    assert (ck / TEXT_ENCODER_DIR / PEFT_WEIGHTS).exists() and (ck / "optimizer_text_encoder.safetensors").exists()
    shutil.copytree(ck, tmp_path / "ck2")
    out = tmp_path / "run"
    assert _run("--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", te_dataset, "--output_dir", out,
                "--max_train_steps", 4, "--checkpointing_steps", 2, *TRAIN,
                "--resume_from_checkpoint", tmp_path / "ck2") == 0
    want, got = _adapter_arrays(te_straight / "lora_weights"), _adapter_arrays(out / "lora_weights")
    assert set(want) == set(got)
    for k in want:
        assert np.array_equal(want[k], got[k]), k
    ref, now = _metrics(te_straight), _metrics(out)
    assert [(r["loss"], r["lr"]) for r in ref[2:]] == [(r["loss"], r["lr"]) for r in now]


def test_resume_with_another_text_encoder_setting_is_refused(te_straight, tiny_mlx_dir, te_dataset, tmp_path, capsys):
    without = TRAIN[:TRAIN.index("--text_encoder_lr")] + TRAIN[TRAIN.index("--text_encoder_lr") + 2:]
    without = without[:without.index("--train_text_encoder")]  # the text-encoder flags come last
    rc = _run("--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", te_dataset, "--output_dir",
              tmp_path / "a", "--max_train_steps", 4, *without,
              "--resume_from_checkpoint", te_straight / "checkpoints" / "checkpoint-2")
    assert rc == 2
    err = capsys.readouterr().err
    assert "was trained with --train_text_encoder and this run is without it" in err
    assert not (tmp_path / "a" / "lora_weights").exists()
    assert _run("--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", te_dataset, "--output_dir",
                tmp_path / "b", "--max_train_steps", 2, "--checkpointing_steps", 2, *without) == 0
    rc = _run("--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", te_dataset, "--output_dir",
              tmp_path / "c", "--max_train_steps", 4, *TRAIN,
              "--resume_from_checkpoint", tmp_path / "b" / "checkpoints" / "checkpoint-2")
    assert rc == 2
    assert "was trained without --train_text_encoder and this run is with it" in capsys.readouterr().err


def test_flags_are_checked():
    from mlx_sd.train_options import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--train_data_dir", "x", "--train_text_encoder", "--text_encoder_targets", "to_q"])
    with pytest.raises(SystemExit):
        parse_args(["--train_data_dir", "x", "--text_encoder_lr", "1e-5"])
    args = parse_args(["--train_data_dir", "x", "--train_text_encoder", "--text_encoder_targets", "fc1", "fc2"])
    assert args.text_encoder_targets == ["fc1", "fc2"] and args.text_encoder_lr is None


def test_two_ranks_train_both_adapters_as_one_process(tiny_mlx_dir, te_dataset, tmp_path):
    """Data parallel with the text encoder training: 2 ranks x batch 1 == 1 process x batch 2 (dropout,
    flips, accumulation on); both adapters within float32 noise (relative L2 1e-5), the same losses."""
    from test_distributed import LAUNCHER, _train_cmd, launch, losses

    if not LAUNCHER.exists():
        pytest.skip("mlx.launch is not installed next to this python")
    common = ["--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", te_dataset, "--max_train_steps", 3,
              "--checkpointing_steps", 0, *SETTINGS]
    one, two = tmp_path / "one", tmp_path / "two"
    assert _run(*common, "--train_batch_size", 2, "--output_dir", one) == 0
    log = launch(_train_cmd(*common, "--train_batch_size", 1, "--output_dir", two))
    assert "done: 3 steps" in log and "data parallel: 2 ranks" in log, log
    a, b = _adapter_arrays(one / "lora_weights"), _adapter_arrays(two / "lora_weights")
    assert set(a) == set(b)
    for part in ("unet", "text_encoder"):
        for w in ("A", "B"):
            keys = sorted(k for k in a if k.startswith(part + ":") and k.endswith(":" + w))
            x = np.concatenate([a[k].ravel() for k in keys])
            y = np.concatenate([b[k].ravel() for k in keys])
            rel = np.linalg.norm(x - y) / np.linalg.norm(x)
            print(f"{part} {w}: relative L2 difference {rel:.2e}")
            assert rel <= 1e-5, (part, w)
    np.testing.assert_allclose([losses(two)[s] for s in (1, 2, 3)], [losses(one)[s] for s in (1, 2, 3)], rtol=1e-5)


def test_batches_bring_the_token_ids_of_the_caption_variants(tiny_mlx_dir):
    """When the text encoder trains, both batch sources hand the step the token ids of `captions(c)`,
    i.e. of the captions after caption dropout and tag shuffling, and the cached one needs no text."""
    from mlx_sd.captions import CaptionVariants
    from mlx_sd.data import BatchPlan, EncodedData
    from mlx_sd.trainer import CachedBatches

    tok = ModelFolder(tiny_mlx_dir).tokenizer()
    captions = [f"a photo, {c} shoes, on white background, product photography" for c in
                ("black", "brown", "white", "blue")]
    plan = BatchPlan(4, 2, seed=7, flip=False)
    data = EncodedData(np.zeros((4, 2, 2, 4), np.float32), np.ones((4, 2, 2, 4), np.float32),
                       np.zeros((0,), np.float32), np.zeros(4, np.int64))
    batches = CachedBatches(plan, slice(0, 2), data, captions, CaptionVariants(0.5, True, 1), None, tok,
                            token_ids=True)
    seen = set()
    for c in range(6):
        _, _, _, ids = batches(c)
        caps = batches.captions(c)
        assert np.array_equal(np.array(ids), tok(caps))
        seen.update(caps)
    assert "" in seen and any(cap not in captions and cap for cap in seen)  # dropped and shuffled variants


def test_validation_val_loss_and_fused_pipeline_use_the_trained_text_encoder(tiny_mlx_dir, te_dataset, tmp_path):
    """Validation images and val_loss run with the text encoder being trained; the fused model folder
    holds the text encoder with its LoRA fused in (== base + the exported adapter)."""
    out = tmp_path / "run"
    assert _run("--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", te_dataset, "--output_dir", out,
                "--max_train_steps", 2, "--checkpointing_steps", 0, *[a for a in TRAIN if a != "--no_validation"],
                "--validation_split", 0.25, "--validation_steps", 1, "--validation_prompts", "blue casual shoes",
                "--num_validation_images", 1, "--validation_inference_steps", 2, "--save_fused_pipeline") == 0
    recs = _metrics(out)
    assert [r["step"] for r in recs if "val_loss" in r] == [1, 2] and all(np.isfinite(r["val_loss"]) for r in recs
                                                                          if "val_loss" in r)
    assert len(list((out / "validation").glob("*_step0001_grid.png"))) == 1
    folder = ModelFolder(tiny_mlx_dir)
    base = folder.text_encoder()
    apply_adapter(folder.unet(), load_adapter(out / "lora_weights"), text_encoder=base)
    ids = mx.array(_ids(folder))
    fused = ModelFolder(out / "final_pipeline").text_encoder()
    assert rel_err(np.array(fused(ids)), np.array(base(ids))) <= 1e-5
    assert rel_err(np.array(fused(ids)), np.array(folder.text_encoder()(ids))) > 1e-6  # the LoRA is in it
