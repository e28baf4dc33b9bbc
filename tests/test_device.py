"""Every device and platform branch runs here, on the CPU, and gives the CPU branch's numbers.

`mlx_sd.device` decides each speed/memory choice per device. The GPU column is forced with the
`gpu_branches` fixture (or MLX_SD_FORCE_GPU_BRANCHES=1 for the whole suite) and compared with the
CPU column: attention chunks on one stream (relative error <= 1e-6 against two streams, float32),
MLX's own convolution gradients (<= 1e-5 against the custom ones), no memory budget (the same
loss from `train.py --check`), the compiled sampler (<= 1e-4 against eager). Metal and macOS
branches run with their queries faked. `test_every_device_branch_has_a_test` fails when a new
`mx.default_device()` / `sys.platform` / `mlx_sd.device` branch appears without a test named for it.
"""

import ast
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_sd
from mlx_sd import device, memory
from mlx_sd.attention import attention, chunk_streams, is_chunked
from fixtures import rel_err

ROOT = Path(__file__).resolve().parents[1]




def both_columns(monkeypatch, fn):
    """`fn()` with the CPU column, then with the GPU column."""
    out = {}
    for gpu in (False, True):
        monkeypatch.setattr(device, "on_gpu", lambda gpu=gpu: gpu)
        out[gpu] = fn()
    return out[False], out[True]


def test_force_variable_selects_the_gpu_column(monkeypatch):
    monkeypatch.setenv(device.FORCE_GPU_ENV, "1")
    assert device.on_gpu() and device.current() == "gpu"
    assert not device.memory_budget_applies() and not device.custom_conv_gradients()
    assert device.attention_streams() == 1 and device.attention_chunk() == 0 and device.compile_sampler()
    assert chunk_streams() == (None,)
    assert "GPU branches forced" in device.one_line() and "GPU column applies" in device.describe()[0]
    monkeypatch.setenv(device.FORCE_GPU_ENV, "0")
    if mx.default_device().type == mx.gpu:
        pytest.skip("a real GPU: the CPU column is what cpu_branches pins")
    monkeypatch.setenv(device.CPU_STREAMS_ENV, "2")
    assert not device.on_gpu() and device.memory_budget_applies() and device.custom_conv_gradients()
    assert device.attention_chunk() == device.CPU_ATTENTION_CHUNK and not device.compile_sampler()
    assert len(chunk_streams()) == 2


def test_gpu_attention_branch_same_numbers(monkeypatch):
    """Chunked attention on the default stream only (the GPU branch) vs two CPU streams."""
    monkeypatch.setenv(device.CPU_STREAMS_ENV, "2")
    r = mx.random.split(mx.random.key(0), 4)
    q, k, v, w = (mx.random.normal((2, 3, 100, 8), key=r[i]) for i in range(4))

    def run():
        streams = chunk_streams()
        f = lambda q, k, v: attention(q, k, v, 0.35, chunk=32, min_tokens=1)
        grads = mx.grad(lambda q, k, v: mx.sum(f(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)
        return streams, [np.array(a) for a in (f(q, k, v), *grads)]

    (cpu_streams, cpu), (gpu_streams, gpu) = both_columns(monkeypatch, run)
    assert len(cpu_streams) == 2 and gpu_streams == (None,)
    fused = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.35)
    errs = [rel_err(a, b) for a, b in zip(gpu, cpu)]
    print("attention, GPU branch (1 stream) vs CPU branch (2 streams): out/dq/dk/dv rel "
          + " ".join(f"{e:.1e}" for e in errs))
    assert max(errs) <= 1e-6 and rel_err(gpu[0], fused) <= 1e-5


def test_gpu_default_attention_is_mlx_fused(monkeypatch):
    q, k, v = (mx.random.normal((1, 2, 2100, 8), key=mx.random.key(i)) for i in range(3))
    fused = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3)
    cpu, gpu = both_columns(monkeypatch, lambda: (is_chunked(2100), attention(q, k, v, 0.3)))
    assert cpu[0] and not gpu[0]  # 2100 >= 2 x 1024 rows: chunked on the CPU only
    assert mx.array_equal(gpu[1], fused)  # the GPU default is MLX's own fused attention, untouched
    assert rel_err(cpu[1], fused) <= 1e-5


@pytest.mark.parametrize("shape,stride", [((2, 4, 6, 96), 1), ((2, 8, 6, 16), 2)], ids=["small-map", "stride2"])
def test_gpu_conv_branch_same_numbers(monkeypatch, shape, stride):
    """On the GPU column the 3x3 convolution is MLX's own (no custom VJP), same output and grads."""
    import mlx_sd.conv as conv_mod

    calls = []
    for name in ("conv3x3", "conv3x3_stride2"):
        real = getattr(conv_mod, name)
        monkeypatch.setattr(conv_mod, name, lambda x, w, real=real: calls.append(x.shape) or real(x, w))
    conv = conv_mod.Conv2d(shape[-1], 24, 3, stride=stride, padding=1)
    x = mx.random.normal(shape, key=mx.random.key(1))
    wy = mx.random.normal(conv(x).shape, key=mx.random.key(2))

    def run():
        calls.clear()

        def loss(params, x):
            conv.update(params)
            return mx.sum(conv(x) * wy)

        gp, gx = mx.grad(loss, argnums=(0, 1))(conv.trainable_parameters(), x)
        return len(calls), [np.array(a) for a in (conv(x), gx, gp["weight"], gp["bias"])]

    (cpu_calls, cpu), (gpu_calls, gpu) = both_columns(monkeypatch, run)
    assert cpu_calls > 0 and gpu_calls == 0
    errs = [rel_err(a, b) for a, b in zip(gpu, cpu)]
    print(f"conv {shape} stride {stride}, MLX's gradients vs custom: out/dx/dw/db rel "
          + " ".join(f"{e:.1e}" for e in errs))
    assert max(errs) <= 1e-5


def _check_run(tiny_mlx_dir, tmp_path, capsys, name):
    from test_training import BASE, make_dataset

    import train

    data = tmp_path / "data"
    if not data.exists():
        make_dataset(data, n=2)
    before = mx.set_memory_limit(77_000_000_000)
    try:
        rc = train.main([str(a) for a in ("--pretrained_model_name_or_path", tiny_mlx_dir, "--train_data_dir", data,
                                          "--output_dir", tmp_path / name, "--check", "--gradient_checkpointing",
                                          "--no_progress", *BASE, "--resolution", 64)])
        assert mx.get_memory_limit() == 77_000_000_000  # restored after the run
    finally:
        mx.set_memory_limit(before)
    out = capsys.readouterr().out
    assert rc == 0, out
    return float(re.search(r"loss on the first batches: ([0-9.]+)", out).group(1)), out


def test_gpu_budget_off_same_loss(tiny_mlx_dir, tmp_path, capsys, monkeypatch):
    """train.py --check with checkpointing: the CPU column sets the budget, the GPU column none;
    the loss (the whole step: convs, attention, budget) is the same."""
    (cpu_loss, cpu_out), (gpu_loss, gpu_out) = both_columns(
        monkeypatch, lambda: _check_run(tiny_mlx_dir, tmp_path, capsys, f"run{device.current()}"))
    assert "memory budget for MLX's scheduler" in cpu_out and "budget for MLX's scheduler" not in gpu_out
    assert "memory budget: UNet weights + 1 GB" in cpu_out and "memory budget: off (MLX's own limit)" in gpu_out
    assert "memory: fits" in cpu_out and "memory: fits" in gpu_out
    print(f"--check loss: CPU column {cpu_loss:.6f}, GPU column {gpu_loss:.6f}")
    assert gpu_loss == pytest.approx(cpu_loss, rel=1e-4)
    unet = object()
    monkeypatch.setattr(memory, "weights_gb", lambda model: 3.4)
    cpu, gpu = both_columns(monkeypatch, lambda: memory.auto_budget_gb(unet, True))
    assert cpu == pytest.approx(3.4 + memory.CHECKPOINTING_HEADROOM_GB) and gpu is None
    assert both_columns(monkeypatch, lambda: memory.auto_budget_gb(unet, False)) == (None, None)


def test_validation_peak_counts_encoders_and_cfg_batch(tiny_mlx_dir):
    from mlx_sd.model_folder import ModelFolder
    from mlx_sd.validation import measure_peak_gb

    folder = ModelFolder(tiny_mlx_dir)
    unet = folder.unet()
    unet.train()
    weights = sum(memory.weights_gb(m) for m in (unet, folder.vae(), folder.text_encoder()))
    small = measure_peak_gb(folder, unet, folder.tokenizer(), ["a shoe"], num_images=1, resolution=64)
    large = measure_peak_gb(folder, unet, folder.tokenizer(), ["a shoe"], num_images=4, resolution=128)
    print(f"validation peak (tiny model): 1 image 64 px {small * 1e3:.1f} MB, 4 images 128 px {large * 1e3:.1f} MB; "
          f"weights {weights * 1e3:.1f} MB")
    assert weights <= small < large and unet.training  # training mode restored
    # The measurement builds validation's own pipeline: a text encoder being trained is used as it
    # is (not loaded a second time), and --validation_dtype's half encoders and fused UNet copy.
    from mlx.utils import tree_flatten

    from mlx_sd.validation import validation_pipeline

    trained = folder.text_encoder()
    trained.train()
    loads = []
    load = folder.text_encoder
    folder.text_encoder = lambda: loads.append(1) or load()
    measure_peak_gb(folder, unet, folder.tokenizer(), ["a shoe"], num_images=1, resolution=64, text_encoder=trained)
    assert loads == [] and trained.training
    measure_peak_gb(folder, unet, folder.tokenizer(), ["a shoe"], num_images=1, resolution=64, dtype="float16")
    assert loads == [1]
    half = validation_pipeline(folder, unet, folder.tokenizer(), "float16")
    assert half.unet is not unet and {v.dtype for m in (half.unet, half.text_encoder, half.vae)
                                      for _, v in tree_flatten(m.parameters())} == {mx.float16}


def test_gpu_sampler_compiles_same_image(tiny_mlx_dir, monkeypatch):
    from mlx_sd.pipeline import StableDiffusion

    kw = {"steps": 2, "height": 64, "width": 64, "seed": 5, "output_type": "np", "sampler": "ddim"}
    cpu, gpu = both_columns(monkeypatch, lambda: StableDiffusion.from_folder(tiny_mlx_dir))
    assert not cpu.compile and gpu.compile
    a, b = cpu.generate("a red shoe", **kw), gpu.generate("a red shoe", **kw)
    print(f"sampler, compiled (GPU default) vs eager (CPU default): rel {rel_err(b, a):.1e}")
    assert rel_err(b, a) <= 1e-4


def fake_metal(monkeypatch, recommended=21.0e9, total=32.0e9):
    seen = []
    monkeypatch.setattr(device, "on_metal", lambda: True)
    monkeypatch.setattr(mx, "device_info", lambda: {"memory_size": int(total),
                                                     "max_recommended_working_set_size": int(recommended)},
                        raising=False)
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: seen.append(n) or 0)
    return seen


def test_metal_memory_and_wired_limit(monkeypatch):
    assert device.on_metal() == (mx.metal.is_available() and mx.default_device().type == mx.gpu)
    if not device.on_metal():
        assert memory.set_wired_limit() is None  # nothing to wire off Metal
    seen = fake_metal(monkeypatch)
    mem = memory.machine_memory()
    assert (mem.total_gb, mem.usable_gb) == (32.0, 21.0) and "Metal" in mem.source
    assert memory.set_wired_limit() == 0 and seen == [21_000_000_000]


def test_machine_memory_elsewhere(monkeypatch):
    monkeypatch.setattr(device, "on_metal", lambda: False)
    text = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n"
    assert memory._meminfo(text)["MemAvailable"] == pytest.approx(20.48)
    if sys.platform.startswith("linux"):
        mem = memory.machine_memory()
        assert 0 < mem.usable_gb <= mem.total_gb and mem.source == "/proc/meminfo available"

    def no_proc(*a, **k):
        raise OSError("no /proc")

    monkeypatch.setattr("builtins.open", no_proc)  # macOS on the CPU, the BSDs: sysconf
    mem = memory.machine_memory()
    assert mem.source == "sysconf physical memory" and mem.total_gb > 0


def test_fit_report_says_what_to_change():
    small = memory.MachineMemory(16.0, 10.0, "test")
    fits, lines = memory.fit_report(5.0, 6.0, small, batch=2, checkpointing=True, base_dtype="float32")
    assert fits and lines[-1].startswith("memory: fits (60%")
    fits, lines = memory.fit_report(9.2, 6.0, small, batch=2, checkpointing=True, base_dtype="float32")
    assert fits and "tight (92%" in lines[1]
    fits, lines = memory.fit_report(12.0, 13.0, small, batch=2, checkpointing=False, base_dtype="float32")
    text = "\n".join(lines)
    assert not fits and "does not fit (130%" in text
    for advice in ("--gradient_checkpointing", "--train_batch_size 1", "--base_dtype bfloat16", "--no_validation"):
        assert advice in text, advice
    fits, lines = memory.fit_report(12.0, None, small, batch=1, checkpointing=True, base_dtype="bfloat16")
    text = "\n".join(lines)
    assert not fits and "--train_batch_size" not in text and "--gradient_checkpointing" not in text


def test_peak_rss_units(monkeypatch):
    sys.path.insert(0, str(ROOT))
    from benchmarks import rss

    monkeypatch.setattr(rss.resource, "getrusage", lambda who: types.SimpleNamespace(ru_maxrss=2_000_000))
    monkeypatch.setattr(rss.sys, "platform", "darwin")
    assert rss.peak_rss_bytes() == 2_000_000  # bytes on macOS
    monkeypatch.setattr(rss.sys, "platform", "linux")
    assert rss.peak_rss_bytes() == 2_048_000_000 and rss.peak_rss_gb() == pytest.approx(2.048)  # KiB on Linux


def test_blas_on_macos_and_other_platforms(monkeypatch):
    from mlx_sd import blas

    monkeypatch.setattr(blas, "_status", None)
    monkeypatch.setattr(blas.sys, "platform", "darwin")
    assert blas.setup().active == "accelerate" and blas.resolved_sgemm_library() is None
    monkeypatch.setattr(blas, "_status", None)
    monkeypatch.setattr(blas.sys, "platform", "win32")
    assert blas.setup().active == "reference" and "win32" in blas.status().reason


def test_doctor_prints_device_choices_and_memory(capsys, monkeypatch):
    from mlx_sd import doctor

    for gpu in (False, True):
        monkeypatch.setattr(device, "on_gpu", lambda gpu=gpu: gpu)
        assert doctor.main([]) == 0
        out = capsys.readouterr().out
        assert f"the {'GPU' if gpu else 'CPU'} column applies" in out and "memory " in out
        for choice in device.CHOICES:
            assert choice.name in out and (choice.gpu if gpu else choice.cpu) in out
        assert ("cblas_sgemm_from" in out) == sys.platform.startswith("linux")


def test_float16_base_is_refused(capsys):
    import train

    with pytest.raises(SystemExit):
        train.parse_args(["--train_data_dir", "x", "--base_dtype", "float16"])
    assert "invalid choice: 'float16'" in capsys.readouterr().err
    assert train.parse_args(["--train_data_dir", "x", "--base_dtype", "bfloat16"]).base_dtype == "bfloat16"


def test_platform_problems_are_named():
    assert mlx_sd.platform_problem() is None
    assert "needs Python 3.10 or newer; this is 3.9" in mlx_sd.platform_problem((3, 9), "darwin", "arm64")
    intel = mlx_sd.platform_problem((3, 12), "darwin", "x86_64")
    assert "Apple Silicon (arm64) only" in intel and "Rosetta" in intel
    assert mlx_sd.platform_problem((3, 12), "darwin", "arm64") is None
    assert mlx_sd.platform_problem((3, 11), "linux", "x86_64") is None


def test_old_python_gets_the_readme_message(tmp_path):
    """A simulated Python 3.9 (sys.version_info replaced at start-up) runs the README's first
    command's check, and `import mlx_sd`: both stop with a message naming the fix."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.version_info = (3, 9, 6, 'final', 0)\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    readme = (ROOT / "README.md").read_text()
    check = re.search(r'"\$PY" -c (\'[^\']*version_info[^\']*\')', readme)
    assert check, "README's set-up command lost its Python version check"
    r = subprocess.run(f"PY={sys.executable}; \"$PY\" -c {check.group(1)} && echo next-step", shell=True,
                       env=env, capture_output=True, text=True, check=False)
    assert r.returncode != 0 and "next-step" not in r.stdout
    assert "Python 3.10 or newer" in r.stderr and "python@3.12" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-c", "import mlx_sd"], env=env, capture_output=True, text=True,
                       cwd=tmp_path, check=False)
    assert r.returncode != 0 and "needs Python 3.10 or newer; this is 3.9" in r.stderr, r.stderr[-500:]
    r = subprocess.run(f"PY={sys.executable}; \"$PY\" -c {check.group(1)} && echo next-step", shell=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, check=False)
    assert r.returncode == 0 and "next-step" in r.stdout, r.stderr  # this Python passes


# Every place that branches on the device or platform, and the test here that runs it on this CPU.
BRANCH_PATTERN = re.compile(r"mx\.default_device\(\)|sys\.platform|platform\.machine\(\)|mx\.metal\b|\bmx\.gpu\b"
                            r"|device\.(on_gpu|on_metal|memory_budget_applies|custom_conv_gradients|"
                            r"attention_streams|attention_chunk|compile_sampler)\(")
BRANCHES = {
    ("mlx_sd/__init__.py", ("def platform_problem(version: tuple = tuple(_sys.version_info[:2]), "
                            "system: str = _sys.platform,")): "test_platform_problems_are_named",
    ("mlx_sd/__init__.py", "machine: str = _platform.machine()) -> str | None:"): "test_platform_problems_are_named",
    ("mlx_sd/attention.py", "return (None,) if device.on_gpu() else _cpu_streams(n)"):
        "test_gpu_attention_branch_same_numbers",
    ("mlx_sd/attention.py", "n = device.attention_streams()"): "test_gpu_attention_branch_same_numbers",
    ("mlx_sd/attention.py", "return device.attention_chunk() if chunk is None else int(chunk)"):
        "test_gpu_default_attention_is_mlx_fused",
    ("mlx_sd/conv.py", "if not device.custom_conv_gradients():"): "test_gpu_conv_branch_same_numbers",
    ("mlx_sd/memory.py", "if not gradient_checkpointing or not device.memory_budget_applies():"):
        "test_gpu_budget_off_same_loss",
    ("mlx_sd/memory.py", "if device.on_metal():"): "test_metal_memory_and_wired_limit",
    ("mlx_sd/memory.py", 'info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()'):
        "test_metal_memory_and_wired_limit",
    ("mlx_sd/memory.py", "if not device.on_metal():"): "test_metal_memory_and_wired_limit",
    ("mlx_sd/pipeline.py", "self.compile = device.compile_sampler() if compile is None else bool(compile)"):
        "test_gpu_sampler_compiles_same_image",
    # Not a choice between devices: the decode's second stream lives on whichever device MLX runs on.
    ("mlx_sd/pipeline.py", "self._decode_stream = mx.new_stream(mx.default_device())"):
        "test_stream_makes_what_generate_makes",
    ("mlx_sd/blas.py", 'if sys.platform == "darwin":'): "test_blas_on_macos_and_other_platforms",
    ("mlx_sd/blas.py", 'if not sys.platform.startswith("linux"):'): "test_blas_on_macos_and_other_platforms",
    ("mlx_sd/blas.py", '_status = BlasStatus("reference", None, f"no fast path for {sys.platform}")'):
        "test_blas_on_macos_and_other_platforms",
    ("mlx_sd/doctor.py", '"platform": f"{platform.system()} {platform.machine()}",'):
        "test_doctor_prints_device_choices_and_memory",
    ("mlx_sd/doctor.py", '"device": str(mx.default_device()),'): "test_doctor_prints_device_choices_and_memory",
    ("mlx_sd/doctor.py", '"metal": bool(getattr(mx, "metal", None) and mx.metal.is_available()),'):
        "test_doctor_prints_device_choices_and_memory",
    ("mlx_sd/doctor.py", 'if sys.platform.startswith("linux"):'): "test_doctor_prints_device_choices_and_memory",
    ("mlx_sd/doctor.py", 'if sys.platform.startswith("linux") and blas.status().active != "openblas":'):
        "test_doctor_prints_device_choices_and_memory",
    ("train.py", 'say(f"BLAS: {blas.status().describe()}; device: {mx.default_device()}")'):
        "test_gpu_budget_off_same_loss",
    ("train.py", 'run.say(f"BLAS: {blas.status().describe()}; device: {mx.default_device()}")'):
        "test_gpu_budget_off_same_loss",
}


def branch_sites() -> dict[tuple[str, str], int]:
    files = [ROOT / "train.py", *sorted((ROOT / "mlx_sd").rglob("*.py")), *sorted((ROOT / "lora").rglob("*.py")),
             *sorted((ROOT / "convert").rglob("*.py"))]
    sites: dict[tuple[str, str], int] = {}
    for f in files:
        rel_path = f.relative_to(ROOT).as_posix()
        if rel_path == "mlx_sd/device.py":  # the switches themselves: tested above one by one
            continue
        text = f.read_text()
        docs = {n for node in ast.walk(ast.parse(text)) if isinstance(node, ast.Expr)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
                for n in range(node.lineno, node.end_lineno + 1)}  # docstrings name the switches too
        for i, line in enumerate(text.splitlines(), 1):
            if BRANCH_PATTERN.search(line) and i not in docs and not line.lstrip().startswith("#"):
                key = (rel_path, line.strip())
                sites[key] = sites.get(key, 0) + 1
    return sites


def test_every_device_branch_has_a_test():
    sites = branch_sites()
    new = sorted(k for k in sites if k not in BRANCHES)
    assert not new, ("device/platform branches without a test that forces them here; route the choice through "
                     "mlx_sd.device, add a test comparing both branches, and list it in BRANCHES: "
                     + "; ".join(f"{p}: {line}" for p, line in new))
    gone = sorted(k for k in BRANCHES if k not in sites)
    assert not gone, f"BRANCHES lists lines that no longer exist: {gone}"
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    missing = sorted({t for t in BRANCHES.values() if f"def {t}(" not in tests})
    assert not missing, f"BRANCHES names tests that do not exist: {missing}"
