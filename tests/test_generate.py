"""mlx-sd-generate: output folder = a training set, resumable bulk runs, clear errors."""

import json
import subprocess
import sys

import mlx_sd  # noqa: F401  (fast BLAS before mlx.core)
import numpy as np
import pytest
from PIL import Image

from mlx_sd import generate as gen
from mlx_sd.data import read_captions
from mlx_sd.pipeline import StableDiffusion

PROMPTS = ["a photo of black casual shoes", "white sneakers on white background"]
FAST = ["--steps", "2", "--height", "64", "--width", "64", "--seed", "7"]


def args(model, out, *extra):
    return ["--model", str(model), "--output_dir", str(out), *FAST, *extra]


def test_writes_images_and_captions(tiny_mlx_dir, tmp_path):
    pf = tmp_path / "prompts.json"
    pf.write_text(json.dumps(PROMPTS))
    out = tmp_path / "out"
    assert gen.main(args(tiny_mlx_dir, out, "--prompts_file", str(pf), "--batch_size", "2")) == 0

    images_dir, records = read_captions(out)
    assert images_dir == out / "images"
    assert records == [("prompt00000_img000.png", PROMPTS[0]), ("prompt00001_img000.png", PROMPTS[1])]
    assert sorted(p.name for p in images_dir.iterdir()) == [r[0] for r in records]  # no temp files left
    for name, _ in records:
        with Image.open(images_dir / name) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
            assert f"Seed: {gen.image_seed(7, int(name[6:11]), 0)}" in im.text["parameters"]
    assert json.loads((out / "generation.json").read_text())["steps"] == 2


def interrupt_saving_after(monkeypatch, n: int) -> list[str]:
    """Ctrl-C while image n + 1 is being saved; returns the names saved before it."""
    real_save, saves = gen.save_png, []

    def save_then_interrupt(image, path, parameters):
        if len(saves) == n:
            raise KeyboardInterrupt
        saves.append(path.name)
        real_save(image, path, parameters)

    monkeypatch.setattr(gen, "save_png", save_then_interrupt)
    return saves


def record_sampled(monkeypatch) -> list[tuple[str, int]]:
    """(prompt, seed) of every image the sampler is asked for from now on."""
    made = []
    real_stream = StableDiffusion.stream

    def counting(self, batches, *a, **kw):
        def seen():
            for prompts, seeds in batches:
                made.extend(zip(prompts, seeds))
                yield prompts, seeds
        return real_stream(self, seen(), *a, **kw)

    monkeypatch.setattr(StableDiffusion, "stream", counting)
    return made


def test_interrupted_run_resumes_without_redoing(tiny_mlx_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "bulk"
    cmd = args(tiny_mlx_dir, out, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--num_images_per_prompt", "2")
    names = [gen.image_name(p, i) for p in range(2) for i in range(2)]

    # First run: Ctrl-C arrives while the third image is being saved.
    real_save = gen.save_png
    saves = interrupt_saving_after(monkeypatch, 2)
    assert gen.main(cmd) == 130
    assert "Re-run the same command" in capsys.readouterr().err
    assert saves == names[:2]
    assert sorted(p.name for p in (out / "images").iterdir()) == names[:2]
    assert json.loads((out / "captions.json").read_text()) == [
        {"file_name": n, "text": PROMPTS[0], "seed": gen.image_seed(7, 0, i)} for i, n in enumerate(names[:2])]
    mtimes = {n: (out / "images" / n).stat().st_mtime_ns for n in names[:2]}

    # Second run: only the two missing images are made.
    monkeypatch.setattr(gen, "save_png", real_save)
    real_stream = StableDiffusion.stream
    made = record_sampled(monkeypatch)
    assert gen.main(cmd) == 0
    assert [p for p, _ in made] == [PROMPTS[1], PROMPTS[1]]
    assert {n: (out / "images" / n).stat().st_mtime_ns for n in names[:2]} == mtimes

    images_dir, records = read_captions(out)
    assert records == [(n, PROMPTS[p]) for n, p in zip(names, (0, 0, 1, 1))]
    assert sorted(p.name for p in images_dir.iterdir()) == names

    # A third run has nothing left to do.
    made.clear()
    assert gen.main(cmd) == 0
    assert made == []

    # Any image can be made again alone from its derived seed.
    monkeypatch.setattr(StableDiffusion, "stream", real_stream)
    sd = StableDiffusion.from_folder(tiny_mlx_dir)
    again = sd.generate(PROMPTS[1], steps=2, height=64, width=64, seed=gen.image_seed(7, 1, 1))[0]
    with Image.open(images_dir / names[3]) as im:
        assert np.array_equal(np.asarray(im), np.asarray(again))


def test_other_settings_in_the_same_folder_are_refused(tiny_mlx_dir, tmp_path, capsys):
    out = tmp_path / "o"
    (out / "images").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(out / "images" / gen.image_name(0, 0))
    (out / "generation.json").write_text(json.dumps({"steps": 2, "sampler": "pndm"}))
    assert gen.main(args(tiny_mlx_dir, out, "--prompt", PROMPTS[0], "--steps", "3")) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "steps: 2 -> 3" in err
    # Existing images made from other prompts are refused too.
    (out / "generation.json").unlink()
    (out / "captions.json").write_text(json.dumps({gen.image_name(0, 0): "something else"}))  # the older format
    assert gen.main(args(tiny_mlx_dir, out, "--prompt", PROMPTS[0])) == 2
    assert "other prompts" in capsys.readouterr().err


@pytest.mark.parametrize("setup, flags, message", [
    (None, ["--prompt", "x", "--model", "{tmp}/no_such_model"], "model folder not found"),
    ("empty.txt", ["--prompts_file", "{tmp}/empty.txt"], "no prompts in it"),
    ("bad.json", ["--prompts_file", "{tmp}/bad.json"], "expected a JSON list of strings"),
    (None, [], "no prompts: give --prompt"),
    (None, ["--prompt", "x", "--lora", "{tmp}/missing_adapter:zero"], "expected PATH or PATH:SCALE"),
    (None, ["--prompt", "x", "--lora", "{tmp}/missing_adapter:0.5"], "not found"),
])
def test_clear_errors(tiny_mlx_dir, tmp_path, capsys, setup, flags, message):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "bad.json").write_text(json.dumps({"prompt": "x"}))
    argv = ["--model", str(tiny_mlx_dir), "--output_dir", str(tmp_path / "out")]
    argv += [f.format(tmp=tmp_path) for f in flags]
    assert gen.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "captions.json").exists()  # refused before touching the output


def test_lora_spec_parsing(tmp_path):
    f = tmp_path / "a.safetensors"
    f.write_bytes(b"")
    assert gen.parse_lora(str(f)) == (f, 1.0)
    assert gen.parse_lora(f"{f}:0.75") == (f, 0.75)
    assert gen.parse_lora(f"{f}:-1") == (f, -1.0)


def test_seeds_depend_only_on_place():
    s = {gen.image_seed(0, p, i) for p in range(20) for i in range(5)}
    assert len(s) == 100
    assert gen.image_seed(0, 3, 1) != gen.image_seed(1, 3, 1)  # the run seed changes every image's seed
    # An image's seed does not depend on how many prompts or images per prompt the run has.
    small = {j.name: j.seed for j in gen.plan(["a"] * 4, 2, 0)}
    large = {j.name: j.seed for j in gen.plan(["b"] * 9, 5, 0)}
    assert small == {n: large[n] for n in small}


def test_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "mlx_sd.generate", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for flag in ("--model", "--prompts_file", "--lora", "--num_images_per_prompt", "--batch_size", "--sampler"):
        assert flag in r.stdout


def _export_adapter(model_dir, folder, seed):
    from lora.export import export_adapter
    from test_pipeline import _random_adapter

    export_adapter(_random_adapter(StableDiffusion.from_folder(model_dir).unet, seed), folder, formats=("peft",))


def test_a_retrained_adapter_at_the_same_path_is_another_adapter(tiny_mlx_dir, tmp_path, capsys):
    lora, out = tmp_path / "lora", tmp_path / "o"
    _export_adapter(tiny_mlx_dir, lora, seed=0)
    one = args(tiny_mlx_dir, out, "--prompt", PROMPTS[0], "--lora", f"{lora}:0.5")
    assert gen.main(one) == 0
    before = (out / "captions.json").read_text()
    _export_adapter(tiny_mlx_dir, lora, seed=1)  # retrained: same path, other weights
    assert gen.main(one + ["--num_images_per_prompt", "2"]) == 2
    err = capsys.readouterr().err
    assert f"{out} holds images of another adapter:\n  lora 1: {lora.resolve()} (sha256 " in err
    assert "the file changed since these images were made (retrained?)" in err
    assert "use another --output_dir for this adapter" in err
    assert [p.name for p in (out / "images").iterdir()] == [gen.image_name(0, 0)]
    assert (out / "captions.json").read_text() == before

    # The same bytes elsewhere are the same adapter: the folder resumes.
    _export_adapter(tiny_mlx_dir, lora, seed=0)
    (lora / "README.md").write_text("notes beside the weights do not change the adapter")
    lora.rename(tmp_path / "moved")
    assert gen.main(args(tiny_mlx_dir, out, "--prompt", PROMPTS[0], "--lora", f"{tmp_path / 'moved'}:0.5",
                         "--num_images_per_prompt", "2")) == 0
    assert len(list((out / "images").iterdir())) == 2

    # A folder that recorded its adapter by path only cannot be checked: refused with what to do.
    settings = json.loads((out / "generation.json").read_text())
    settings["lora"] = [[str(tmp_path / "moved"), 0.5]]
    (out / "generation.json").write_text(json.dumps(settings))
    assert gen.main(args(tiny_mlx_dir, out, "--prompt", PROMPTS[0], "--lora", f"{tmp_path / 'moved'}:0.5",
                         "--num_images_per_prompt", "3")) == 2
    err = capsys.readouterr().err
    assert "recorded by path only" in err and f"If they are, delete {out / 'generation.json'} and re-run" in err


def test_generating_into_a_dataset_of_photos_never_hides_them(tiny_mlx_dir, tmp_path, capsys):
    from mlx_sd.data import scan

    data = tmp_path / "photos"
    (data / "images").mkdir(parents=True)
    for name in ("a.png", "b.jpg"):
        Image.new("RGB", (64, 64), "white").save(data / "images" / name)
        (data / "images" / name).with_suffix(".txt").write_text(f"a photo {name}")
    assert gen.main(args(tiny_mlx_dir, data, "--prompt", PROMPTS[0])) == 2
    err = capsys.readouterr().err
    assert (f"--output_dir {data} holds 2 image(s) that mlx-sd-generate did not make and captions.json does not "
            "list (images/a.png, images/b.jpg)") in err and "Generate into another folder" in err
    assert not (data / "captions.json").exists() and not (data / "generation.json").exists()
    assert sorted(s.path.name for s in scan(data)[0]) == ["a.png", "b.jpg"]

    # Listed in captions.json, the photos are kept beside the generated images.
    (data / "captions.json").write_text(json.dumps({"a.png": "a photo a.png", "b.jpg": "a photo b.jpg"}))
    assert gen.main(args(tiny_mlx_dir, data, "--prompt", PROMPTS[0])) == 0
    good, problems = scan(data)
    assert sorted(s.path.name for s in good) == ["a.png", "b.jpg", gen.image_name(0, 0)] and not problems


def test_records_cost_does_not_grow_with_the_folder(tmp_path):
    """The last 100 records of a 5,000-image folder: appended to the journal, not 100 rewrites of the file."""
    from mlx_sd import generate_folder as gf

    out = tmp_path / "o"
    (out / "images").mkdir(parents=True)
    jobs = gf.plan([f"prompt {p}" for p in range(1000)], 5, seed=0)
    for j in jobs:
        (out / "images" / j.name).touch()
    captions = {j.name: gf.record(j) for j in jobs[:4900]}
    gf.write_captions(out, out / "images", captions)
    full = (out / "captions.json").stat().st_size
    records = gf.Records(out, captions)
    for j in jobs[4900:]:
        records.add([gf.record(j, 30.0)])
    assert (out / "captions.json").stat().st_size == full  # not rewritten: 100 < 4,900 / 10
    assert (out / gf.JOURNAL_FILE).stat().st_size < full / 40
    # A run killed here loses no record: the journal is read back (a line cut short is dropped).
    with open(out / gf.JOURNAL_FILE, "a") as f:
        f.write('{"file_name": "prompt00999_im')
    back = gf.read_captions(out)
    assert len(back) == 5000 and back[jobs[-1].name] == gf.record(jobs[-1], 30.0)
    records.flush()
    assert not (out / gf.JOURNAL_FILE).exists()
    assert [r["file_name"] for r in json.loads((out / "captions.json").read_text())] == [j.name for j in jobs]
