"""The README's first command: the demo trains end to end without torch/diffusers."""

import json
import subprocess
import sys

CODE = """
import sys
from mlx_sd.demo import main
rc = main(["--output_dir", sys.argv[1], "--steps", "4", "--images", "6"])
leaked = [m for m in ("torch", "diffusers", "peft") if m in sys.modules]
print("LEAKED", leaked)
sys.exit(rc or (3 if leaked else 0))
"""


def test_demo_runs_without_reference_libraries(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "mine.txt").write_text("an earlier demo run")  # kept, never deleted
    out = subprocess.run([sys.executable, "-c", CODE, str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "LEAKED []" in out.stdout
    run = tmp_path / "run"
    assert len(json.loads((tmp_path / "dataset" / "captions.json").read_text())) == 6
    assert (run / "lora_weights" / "pytorch_lora_weights.safetensors").exists()
    assert (run / "checkpoints" / "checkpoint-4").is_dir()
    assert sorted(p.name for p in (run / "validation").glob("*_grid.png")) == [
        "epoch000_step0002_grid.png", "epoch001_step0004_grid.png"]
    assert "demo finished" in out.stdout
    kept = list(tmp_path.glob("run-*/mine.txt"))
    assert len(kept) == 1 and kept[0].read_text() == "an earlier demo run"
