"""The latent cache: a valid cache is reused (and completed), a damaged one is rebuilt with a warning.

A run that trains the text encoder caches the UNet side only; the next run with a frozen text
encoder adds the text embeddings to the same cache instead of encoding every image again. With
aspect-ratio buckets the latents are one array per bucket, which is the case that must survive
the re-save.
"""

import logging

import numpy as np
import pytest

from mlx_sd.data import load_or_encode, scan
from mlx_sd.model_folder import ModelFolder
from test_training import make_dataset


def _never(what):
    def fail():
        raise AssertionError(f"{what} loaded: the cache was not used")
    return fail


@pytest.mark.parametrize("bucketed", [False, True])
def test_cache_of_a_text_encoder_run_is_completed_not_rebuilt(tiny_mlx_dir, tmp_path, caplog, bucketed):
    folder = ModelFolder(tiny_mlx_dir)
    tok, (samples, _) = folder.tokenizer(), scan(make_dataset(tmp_path / "data", n=4, size=64))
    buckets = (np.array([0, 1, 0, 1]), np.array([[64, 64], [64, 48]])) if bucketed else None
    cache = tmp_path / "cache"
    first = load_or_encode(cache, "k", samples, 64, True, folder.vae, None, tok, progress=False, buckets=buckets)
    assert first.text.size == 0 and isinstance(first.mean, list) == bucketed
    (path,) = cache.iterdir()

    caplog.set_level(logging.INFO, logger="mlx_sd.data")
    second = load_or_encode(cache, "k", samples, 64, True, _never("the VAE"), folder.text_encoder, tok,
                            progress=False, buckets=buckets)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert second.text.shape[0] == len({s.caption for s in samples})
    with np.load(path) as z:  # the embeddings were added to the cache file
        assert np.array_equal(z["text"], second.text) and np.array_equal(z["caption_index"], second.caption_index)

    third = load_or_encode(cache, "k", samples, 64, True, _never("the VAE"), _never("the text encoder"), tok,
                           progress=False, buckets=buckets)
    assert np.array_equal(third.text, second.text)
    for name in ("mean", "std", "mean_flip", "std_flip"):
        a, b = getattr(first, name), getattr(third, name)
        assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b), name


def test_a_damaged_cache_is_named_and_rebuilt(tiny_mlx_dir, tmp_path, caplog):
    folder = ModelFolder(tiny_mlx_dir)
    tok, (samples, _) = folder.tokenizer(), scan(make_dataset(tmp_path / "data", n=2, size=64))
    cache = tmp_path / "cache"
    good = load_or_encode(cache, "k", samples, 64, False, folder.vae, folder.text_encoder, tok, progress=False)
    (path,) = cache.iterdir()
    path.write_bytes(path.read_bytes()[:100])  # truncated
    again = load_or_encode(cache, "k", samples, 64, False, folder.vae, folder.text_encoder, tok, progress=False)
    assert f"ignoring unreadable cache {path}" in caplog.text
    assert np.allclose(again.mean, good.mean, atol=1e-6)
    with np.load(path) as z:  # rewritten whole
        assert np.array_equal(z["mean"], again.mean)
