"""lora_weights/README.md: a model card the Hub reads (huggingface_hub's own parser), with the widget image."""

import json

import pytest
from huggingface_hub import ModelCard

from mlx_sd.model_card import WIDGET_IMAGE, trigger_words, write_model_card
from test_training import make_dataset, run_train


def test_trained_run_writes_a_complete_card(tiny_mlx_dir, tmp_path):
    data = make_dataset(tmp_path / "data", n=4)
    caps = json.loads((data / "captions.json").read_text())
    (data / "captions.json").write_text(json.dumps({k: f"shoe-trigger, {v}" for k, v in caps.items()}))
    out = tmp_path / "run"
    assert run_train("--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", data, "--output_dir", out,
                     "--resolution", 64, "--train_batch_size", 2, "--max_train_steps", 2, "--shuffle_caption",
                     "--keep_tokens", 1, "--validation_prompts", "shoe-trigger, black shoes", "white sneakers",
                     "--num_validation_images", 1, "--validation_inference_steps", 2, "--validation_steps", 0,
                     "--checkpointing_steps", 0) == 0
    folder = out / "lora_weights"
    card = ModelCard.load(folder / "README.md")
    meta = card.data.to_dict()
    assert meta["license"] == "creativeml-openrail-m" and meta["library_name"] == "diffusers"
    assert {"lora", "text-to-image", "stable-diffusion", "mlx"} <= set(meta["tags"])
    assert "base_model" not in meta  # a local folder is no Hub id
    assert meta["instance_prompt"] == "shoe-trigger"
    assert [w["text"] for w in meta["widget"]] == ["shoe-trigger, black shoes", "white sneakers"]
    assert all((folder / w["output"]["url"]).is_file() for w in meta["widget"])
    text = card.text
    for name in ("pytorch_lora_weights.safetensors", "adapter_model.safetensors", "lora_kohya.safetensors"):
        assert f"`{name}`" in text and (folder / name).is_file()
    assert "| updates | 2 |" in text and "rank 8, alpha 16.0" in text and "tags shuffled (first 1 kept)" in text
    assert "ComfyUI and A1111 load `lora_kohya.safetensors` completely" in text
    assert "<lora:lora_kohya:0.8>" in text and "load_lora_weights(" in text


def test_hub_base_model_and_no_validation(tmp_path):
    cfg = {"pretrained_model_name_or_path": "stable-diffusion-v1-5/stable-diffusion-v1-5", "output_dir": "runs/shoes",
           "train_batch_size": 2, "gradient_accumulation_steps": 4, "world_size": 2, "lora_rank": 4,
           "lora_alpha": 4.0, "lora_targets": ["to_q", "to_v"], "dataset_name": "me/shoes", "caption_dropout_rate": 0.1}
    path = write_model_card(tmp_path, cfg, 300, ['a photo of "red" shoes: side view'] * 3, [], None, {})
    meta = ModelCard.load(path).data.to_dict()
    assert meta["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert "widget" not in meta and "instance_prompt" not in meta and not (tmp_path / WIDGET_IMAGE).exists()
    text = path.read_text()
    assert "| images per update | 16 (2 per micro-batch x 4 accumulation x 2 rank(s)) |" in text
    assert "caption_dropout_rate 0.1" in text and "from me/shoes (1 distinct captions)" in text
    assert '"a photo of \\"red\\" shoes: side view"' in text  # quoted, as code and YAML need
    assert "float32 adapter on float32 base weights" in text


def test_card_names_a_half_precision_base(tmp_path):
    cfg = {"pretrained_model_name_or_path": "models/sd15", "output_dir": "runs/shoes", "base_dtype": "bfloat16"}
    text = write_model_card(tmp_path, cfg, 10, ["shoes"], [], None, {}).read_text()
    assert "float32 adapter on bfloat16 base weights" in text and "(MLX, float32)" not in text
    assert "| precision | float32 adapter, bfloat16 base weights |" in text


@pytest.mark.parametrize("caps, keep, expected", [
    (["tok, a", "tok, b", "tok, c"], 1, ["tok"]),
    (["tok, x, a", "tok, x, b"], 2, ["tok, x"]),
    (["a, b"], 0, []),
])
def test_trigger_words(caps, keep, expected):
    assert trigger_words(caps, keep) == expected
