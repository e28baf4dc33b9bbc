"""Caption dropout and tag shuffling: kohya's semantics, a pure function of (seed, micro-batch, position).

Training checks: the cached path (empty caption's embedding computed once; or shuffled captions
encoded per step) gives the losses of the encode-every-step path within 1e-4 relative, so both
train on the same variants; a run resumed from a checkpoint ends with the adapter of a straight run.
"""

import json

import numpy as np
import pytest

from mlx_sd.captions import CaptionError, CaptionVariants
from test_resume import _weights
from test_training import make_dataset, run_train

TAGS = "shoe-trigger, black leather, casual shoes, side view, white background"


def test_no_variants_leaves_captions_alone():
    assert not CaptionVariants().active and CaptionVariants()(TAGS, 1, 2, 3) == TAGS


def test_dropout_rate_and_determinism():
    v = CaptionVariants(dropout=0.25)
    draws = [v(TAGS, seed=5, c=c, position=p) for c in range(500) for p in range(4)]
    assert set(draws) == {"", TAGS}
    rate = draws.count("") / len(draws)
    assert abs(rate - 0.25) < 3 * np.sqrt(0.25 * 0.75 / len(draws)), rate  # within 3 sigma
    assert draws == [v(TAGS, seed=5, c=c, position=p) for c in range(500) for p in range(4)]
    assert draws != [v(TAGS, seed=6, c=c, position=p) for c in range(500) for p in range(4)]


def test_shuffle_keeps_the_first_tokens_and_permutes_the_rest():
    v = CaptionVariants(shuffle=True, keep_tokens=1)
    tags = [t.strip() for t in TAGS.split(",")]
    seen = set()
    for c in range(200):
        out = v(TAGS, seed=0, c=c, position=0).split(", ")
        assert out[0] == "shoe-trigger" and sorted(out) == sorted(tags)
        seen.add(tuple(out))
    assert len(seen) > 12  # 4! = 24 orders of the four free tags, most of them drawn
    assert v("a, b", 0, 0, 0) in ("a, b")  # keep 1 of 2: nothing left to shuffle
    assert CaptionVariants(shuffle=True, separator="|")("x| y |z", 0, 1, 0).count(", ") == 2


def test_variants_of_a_batch_depend_on_global_positions():
    v = CaptionVariants(dropout=0.5, shuffle=True)
    caps = [TAGS] * 4
    whole = v.for_batch(caps, 3, 7, 0)
    assert v.for_batch(caps[:2], 3, 7, 0) + v.for_batch(caps[2:], 3, 7, 2) == whole  # 2 ranks == 1 process


def _losses(out):
    logs = sorted((out / "logs").iterdir())[-1]
    return [r["loss"] for r in map(json.loads, (logs / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    data = make_dataset(tmp_path_factory.mktemp("tags") / "data", n=4)
    caps = json.loads((data / "captions.json").read_text())
    caps = {k: f"shoe-trigger, {v.replace(' on ', ', ')}, product photo" for k, v in caps.items()}
    (data / "captions.json").write_text(json.dumps(caps))
    return data


BASE = ["--resolution", 64, "--train_batch_size", 2, "--lr_warmup_steps", 0, "--lr_scheduler", "constant",
        "--no_validation", "--seed", 3]


VARIANTS = {"dropout": CaptionVariants(dropout=0.5),
            "dropout+shuffle": CaptionVariants(dropout=0.3, shuffle=True, keep_tokens=1)}


@pytest.mark.parametrize("name", VARIANTS)
def test_cached_and_per_step_sources_give_the_same_text(tiny_mlx_dir, tagged, name):
    import mlx.core as mx

    from mlx_sd.data import BatchPlan, load_or_encode, scan
    from mlx_sd.model_folder import ModelFolder
    from mlx_sd.trainer import CachedBatches, EncodingBatches

    folder, v = ModelFolder(tiny_mlx_dir), VARIANTS[name]
    tok, samples = folder.tokenizer(), scan(tagged)[0]
    plan = BatchPlan(len(samples), 2, 3, False)
    data = load_or_encode(None, "k", samples, 64, False, folder.vae, folder.text_encoder, tok, progress=False)
    cached = CachedBatches(plan, slice(0, 2), data, [s.caption for s in samples], v, folder.text_encoder(), tok)
    per_step = EncodingBatches(plan, slice(0, 2), samples, 64, True, folder.vae(), folder.text_encoder(), tok, v)
    try:
        drawn = []
        for c in range(8):
            assert cached.captions(c) == per_step.captions(c)
            drawn += cached.captions(c)
            a, b = cached(c)[3], per_step(c)[3]
            assert float(mx.abs(a - b).max()) <= 1e-5 * float(mx.abs(b).max()), c
    finally:
        per_step.close()
    originals = {s.caption for s in samples}
    assert "" in drawn and any(d in originals for d in drawn)
    if v.shuffle:
        assert any(d and d not in originals for d in drawn) and all(d.startswith("shoe-trigger") for d in drawn if d)


@pytest.mark.parametrize("flags", [["--caption_dropout_rate", 0.5],
                                   ["--caption_dropout_rate", 0.3, "--shuffle_caption", "--keep_tokens", 1]],
                         ids=["dropout", "dropout+shuffle"])
def test_cached_and_per_step_encoding_train_alike(tiny_mlx_dir, tagged, tmp_path, flags, capsys):
    """End to end. The two paths' VAE posteriors differ in the last float32 bits (batched encode), and
    Adam turns such differences into visible ones within a few steps, so step 1 is compared at 1e-5
    and the rest at 2e-3; the run without variants is 5e-3 away at step 1."""
    common = ["--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", tagged, "--max_train_steps", 4,
              "--checkpointing_steps", 0, *BASE, *flags]
    assert run_train(*common, "--output_dir", tmp_path / "cached") == 0
    assert "caption variants: dropout" in capsys.readouterr().out
    assert run_train(*common, "--output_dir", tmp_path / "uncached", "--no_cache") == 0
    assert run_train(*common[:-len(flags)], "--output_dir", tmp_path / "plain") == 0
    a, b, plain = _losses(tmp_path / "cached"), _losses(tmp_path / "uncached"), _losses(tmp_path / "plain")
    print(flags, "cached", a, "per step", b, "no variants", plain)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
    np.testing.assert_allclose(a, b, rtol=2e-3)
    assert abs(a[0] - plain[0]) > 1e-3 * plain[0]  # the variants changed what was trained


def test_resumed_run_draws_the_same_variants(tiny_mlx_dir, tagged, tmp_path):
    """Steps 4-6 resumed from step 3's checkpoint (copied elsewhere) end with the straight run's adapter."""
    import shutil

    common = ["--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", tagged, *BASE,
              "--learning_rate", 1e-3, "--caption_dropout_rate", 0.3, "--shuffle_caption", "--keep_tokens", 1,
              "--checkpointing_steps", 3, "--max_train_steps", 6]
    assert run_train(*common, "--output_dir", tmp_path / "straight") == 0
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "checkpoint-3", tmp_path / "ck3")
    assert run_train(*common, "--output_dir", tmp_path / "resumed", "--resume_from_checkpoint", tmp_path / "ck3") == 0
    (a1, b1), (a2, b2) = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    for k in b1:
        np.testing.assert_array_equal(b1[k], b2[k], err_msg=k)
        np.testing.assert_array_equal(a1[k], a2[k], err_msg=k)
    assert _losses(tmp_path / "straight")[3:] == _losses(tmp_path / "resumed")


def test_flags_are_checked():
    import train

    with pytest.raises(SystemExit):
        train.parse_args(["--train_data_dir", "x", "--keep_tokens", "2"])
    with pytest.raises(SystemExit):
        train.parse_args(["--train_data_dir", "x", "--caption_dropout_rate", "1"])
    args = train.parse_args(["--train_data_dir", "x", "--shuffle_caption", "--keep_tokens", "2"])
    assert args.shuffle_caption and args.keep_tokens == 2


def test_per_batch_draws_never_share_a_generator_key():
    """Flips, random crops and caption variants are independent: no indices give two kinds one key."""
    from mlx_sd.captions import caption_key
    from mlx_sd.data import crop_key, flip_key

    r = range(12)
    kinds = {"flip": {tuple(flip_key(7, e, j)) for e in r for j in r},
             "crop": {tuple(crop_key(7, c, p)) for c in r for p in r},
             "caption": {tuple(caption_key(7, c, p)) for c in r for p in r}}
    names = list(kinds)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not kinds[a] & kinds[b], (a, b, sorted(kinds[a] & kinds[b])[:3])


def test_keep_tokens_above_the_tag_count_is_said(caplog):
    v = CaptionVariants(shuffle=True, keep_tokens=3)
    v.check([TAGS, "a, b, c"])  # 5 and 3 tags: both shuffle (or keep all), nothing to say
    assert not caplog.records
    v.check([TAGS, "plain caption without tags", TAGS])
    (record,) = caplog.records
    assert record.levelname == "WARNING" and record.getMessage() == (
        "--keep_tokens 3 is above the tag count of 1 of 3 captions (e.g. 'plain caption without tags' has 1 tag(s) "
        "separated by ','): their tags are not shuffled")
    with pytest.raises(CaptionError, match=r"--keep_tokens 6 is above the tag count of every caption \(e.g. "
                       r"'shoe-trigger, .*' has 5 tag\(s\) separated by ','\): --shuffle_caption would shuffle "
                       "nothing"):
        CaptionVariants(shuffle=True, keep_tokens=6).check([TAGS, "a, b"])


def test_keep_tokens_above_every_tag_count_stops_the_run(tiny_mlx_dir, tagged, tmp_path, capsys):
    rc = run_train("--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", tagged, *BASE,
                   "--max_train_steps", 1, "--shuffle_caption", "--keep_tokens", 9, "--output_dir", tmp_path / "o")
    assert rc == 2 and "--keep_tokens 9 is above the tag count of every caption" in capsys.readouterr().err
