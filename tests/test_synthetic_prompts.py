"""Prompt templates: parsing, balanced seeded expansion, and a resumed bulk run from a template."""

import itertools
import json
import re

import numpy as np
import pytest
from PIL import Image

import mlx_sd  # noqa: F401  (fast BLAS before mlx.core)
from mlx_sd import generate as gen
from mlx_sd.prompts import TemplateError, balanced_choices, expand, parse
from test_generate import interrupt_saving_after, record_sampled

SHOES = """# the issue's example
color = black | brown | white | blue
a professional product photo of {color} {leather|canvas|suede} casual shoes, \
{side view|three-quarter view|top view}, white background
"""
COLORS = ("black", "brown", "white", "blue")
MATERIALS = ("leather", "canvas", "suede")
VIEWS = ("side view", "three-quarter view", "top view")


SHAPE = re.compile(r"^a professional product photo of (\w+) (\w+) casual shoes, (.+), white background$")


def counts(prompts: list[str], words) -> list[int]:
    """How often each of `words` fills its slot (COLORS, MATERIALS or VIEWS) in the SHOES prompts."""
    slot = (COLORS, MATERIALS, VIEWS).index(words)
    filled = [SHAPE.match(p).group(slot + 1) for p in prompts]
    return [filled.count(w) for w in words]


def test_all_combinations():
    prompts = expand(parse(SHOES))
    assert len(prompts) == len(set(prompts)) == 36
    assert prompts[0] == "a professional product photo of black leather casual shoes, side view, white background"
    want = {f"a professional product photo of {c} {m} casual shoes, {v}, white background"
            for c, m, v in itertools.product(COLORS, MATERIALS, VIEWS)}
    assert set(prompts) == want


@pytest.mark.parametrize("n", [7, 10, 35, 37, 50, 100])
def test_counts_per_alternative_are_balanced_within_one(n):
    prompts = expand(parse(SHOES), n, seed=0)
    assert len(prompts) == n
    for words in (COLORS, MATERIALS, VIEWS):
        c = counts(prompts, words)
        assert sum(c) == n and max(c) - min(c) <= 1, (words, c)
    if n <= 36:
        assert len(set(prompts)) == n  # no repeat before every combination is used


def test_every_prefix_is_balanced_on_many_shapes():
    """Every prefix within 1 per slot, and every combination once per cycle, on many slot shapes."""
    for sizes in [(2, 2), (2, 3), (3, 3), (2, 4), (4, 3, 3), (2, 2, 2, 2), (5, 3), (3, 5, 2), (7,), (2, 3, 4, 5),
                  (6, 4, 9), ()]:
        for seed in range(3):
            c = int(np.prod(sizes))
            picks = balanced_choices(sizes, 2 * c + 3, seed)
            for k in range(1, len(picks) + 1):
                for i, size in enumerate(sizes):
                    got = np.bincount([p[i] for p in picks[:k]], minlength=size)
                    assert got.max() - got.min() <= 1, (sizes, seed, k, i, got)
            every = sorted(itertools.product(*map(range, sizes)))
            assert sorted(picks[:c]) == every and sorted(picks[c:2 * c]) == every, (sizes, seed)


def test_seed_fixes_the_prompts_and_growing_n_keeps_them():
    t = parse(SHOES + "a {red|green} sneaker\n")
    a, b, c = expand(t, 20, seed=4), expand(t, 20, seed=4), expand(t, 20, seed=5)
    assert a == b and a != c
    assert expand(t, 31, seed=4)[:20] == a  # more prompts later: the first ones are the same
    per_template = [sum("sneaker" in p for p in a), sum("casual shoes" in p for p in a)]
    assert per_template == [10, 10]
    assert sorted(p for p in a if "sneaker" in p) == ["a green sneaker"] * 5 + ["a red sneaker"] * 5


def test_named_slot_used_twice_takes_one_value_and_empty_alternative():
    t = parse("tone = warm | cool\n{tone} light on a {tone} {|matte} wall , studio\n")
    prompts = expand(t)
    assert prompts == ["warm light on a warm wall, studio", "warm light on a warm matte wall, studio",
                       "cool light on a cool wall, studio", "cool light on a cool matte wall, studio"]


@pytest.mark.parametrize("text, message", [
    ("a {color} shoe\n", "line 1: slot {color} is not defined"),
    ("a {red|{x}} shoe\n", "line 1: unbalanced or nested braces"),
    ("a {red|green shoe\n", "unbalanced or nested braces"),
    ("c = a | b\nc = d | e\n{c}\n", "line 2: slot 'c' is defined twice"),
    ("c = a | b\n", "no template lines"),
    ("a {red|red} shoe\n", "listed twice"),
    ("a {} shoe\n", "empty slot"),
])
def test_template_errors_name_the_line(text, message):
    with pytest.raises(TemplateError, match=re.escape(message)):
        parse(text, "t.txt")


def test_resumed_template_run_makes_no_duplicate_and_misses_none(tiny_mlx_dir, tmp_path, monkeypatch):
    template = tmp_path / "shoes.txt"
    template.write_text(SHOES)
    cmd = ["--model", str(tiny_mlx_dir), "--template", str(template), "--num_prompts", "5", "--num_images_per_prompt",
           "2", "--steps", "2", "--height", "64", "--width", "64", "--seed", "3", "--batch_size", "3"]
    full = tmp_path / "full"
    assert gen.main([*cmd, "--output_dir", str(full)]) == 0

    part = tmp_path / "part"
    real_save = gen.save_png
    interrupt_saving_after(monkeypatch, 4)
    assert gen.main([*cmd, "--output_dir", str(part)]) == 130
    monkeypatch.setattr(gen, "save_png", real_save)
    sampled = record_sampled(monkeypatch)
    assert gen.main([*cmd, "--output_dir", str(part)]) == 0
    made = [seed for _, seed in sampled]
    assert len(made) == 10 - 4 and len(set(made)) == len(made)  # only the missing ones, each once

    a = json.loads((full / "captions.json").read_text())
    b = json.loads((part / "captions.json").read_text())
    assert a == b and len(a) == 10 and len({r["file_name"] for r in a}) == 10
    prompts = expand(parse(SHOES), 5, seed=3)
    assert [r["text"] for r in a] == [p for p in prompts for _ in range(2)]
    assert all(r["seed"] == gen.image_seed(3, int(r["file_name"][6:11]), int(r["file_name"][15:18])) for r in a)
    for r in a:  # every image made once, the same in both runs (batched differently: uint8 rounding may differ)
        with Image.open(full / "images" / r["file_name"]) as x, Image.open(part / "images" / r["file_name"]) as y:
            assert np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max() <= 1
    assert sorted(p.name for p in (part / "images").iterdir()) == sorted(r["file_name"] for r in a)


def test_num_prompts_without_template_is_refused(tiny_mlx_dir, tmp_path, capsys):
    assert gen.main(["--model", str(tiny_mlx_dir), "--prompt", "x", "--num_prompts", "3",
                     "--output_dir", str(tmp_path / "o")]) == 2
    assert "--num_prompts applies to --template prompts" in capsys.readouterr().err
