"""MLX CLIP text encoder and tokenizer vs transformers."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers import CLIPTextModel as TorchCLIPTextModel
from transformers import CLIPTokenizer

from fixtures import SD15
from mlx_sd.model_folder import ModelFolder
from mlx_sd.tokenizer import Tokenizer

PROMPTS = [
    "A professional product photo of black casual shoes on white background, high quality, product photography",
    "",
    "Émigré café — naïve façade, 東京の靴, 👟 sneakers!!",
    " ".join(["a very long prompt about brown leather casual shoes"] * 12),  # > 77 tokens
    "UPPER case   and   spaces\tand\nnewlines",
]


@pytest.mark.parametrize("folder", ["real", "tiny"])
def test_token_ids_match_transformers(folder, tiny_diffusers_dir):
    path = SD15 / "tokenizer" if folder == "real" else tiny_diffusers_dir / "tokenizer"
    ref = CLIPTokenizer.from_pretrained(str(path))
    expected = ref(PROMPTS, padding="max_length", max_length=ref.model_max_length, truncation=True).input_ids
    ids = Tokenizer(path)(PROMPTS)
    assert ids.shape == (len(PROMPTS), 77)
    assert ids.tolist() == expected


def test_real_vocab_known_ids():
    ids = Tokenizer(SD15 / "tokenizer")(
        "a professional product photo of black casual shoes on white background, high quality"
    )[0]
    want = [49406, 320, 4774, 4306, 1125, 539, 1449, 10129, 4079, 525, 1579, 5994, 267, 1400, 3027, 49407]
    assert ids[: len(want)].tolist() == want
    assert (ids[len(want):] == 49407).all()  # SD1.5 pads with <|endoftext|>


def test_long_prompt_is_truncated_with_eos_last(caplog):
    tok = Tokenizer(SD15 / "tokenizer")
    ids = tok(PROMPTS[3])[0]
    assert ids[0] == 49406 and ids[-1] == 49407 and len(ids) == 77
    assert "truncated" in caplog.text


def test_text_encoder_parity(tiny_diffusers_dir, tiny_mlx_dir):
    ref = TorchCLIPTextModel.from_pretrained(str(tiny_diffusers_dir / "text_encoder")).eval()
    folder = ModelFolder(tiny_mlx_dir)
    model = folder.text_encoder()
    ids = folder.tokenizer()(PROMPTS)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
    got = np.array(model(mx.array(ids)))
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel <= 1e-4, rel


def test_clip_skip_matches_hidden_states(tiny_diffusers_dir, tiny_mlx_dir):
    ref = TorchCLIPTextModel.from_pretrained(str(tiny_diffusers_dir / "text_encoder")).eval()
    folder = ModelFolder(tiny_mlx_dir)
    ids = folder.tokenizer()(PROMPTS[:2])
    with torch.no_grad():
        out = ref(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
        want = getattr(ref, "text_model", ref).final_layer_norm(out.hidden_states[-2]).numpy()
    got = np.array(folder.text_encoder()(mx.array(ids), clip_skip=1))
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4
