"""Run logs: the run config, `metrics.jsonl`, optional TensorBoard events, a loss-curve PNG."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

logger = logging.getLogger(__name__)


def setup_logging(log_dir: Path) -> None:
    """main_log.txt in `log_dir`; warnings and errors also on stderr (unless logged with FILE_ONLY)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    fh = logging.FileHandler(log_dir / "main_log.txt")
    fh.setFormatter(fmt)
    root.addHandler(fh)
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in root.handlers):
        sh = logging.StreamHandler()
        sh.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        sh.setLevel(logging.WARNING)
        sh.addFilter(lambda record: not getattr(record, "file_only", False))
        root.addHandler(sh)


FILE_ONLY = {"file_only": True}  # `logger.error(msg, extra=FILE_ONLY)`: for messages also printed to the user


class MetricsLog:
    def __init__(self, log_dir: Path, report_to: str = "none"):
        self.path = log_dir / "metrics.jsonl"
        self.tb = None
        if report_to == "tensorboard":
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(log_dir))
            except ImportError:
                logger.warning("--report_to tensorboard: tensorboardX is not installed (pip install tensorboardX); "
                               "metrics go to %s only", self.path)
                print(f"warning: tensorboardX not installed; metrics are written to {self.path} only")

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(records: list[dict], out: Path, smooth: int = 20) -> Path | None:
    """A plain loss curve (raw and moving average) drawn with PIL; no plotting library needed."""
    from PIL import Image, ImageDraw

    pts = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int,
                                                                                 float)) and math.isfinite(r["loss"])]
    if len(pts) < 2:
        return None
    W, H, pad = 800, 400, 50
    steps = [p[0] for p in pts]
    losses = [p[1] for p in pts]
    lo, hi = min(losses), max(losses)
    hi = hi if hi > lo else lo + 1e-8
    s0, s1 = min(steps), max(steps)
    s1 = s1 if s1 > s0 else s0 + 1

    def xy(s, v):
        return pad + (s - s0) / (s1 - s0) * (W - 2 * pad), H - pad - (v - lo) / (hi - lo) * (H - 2 * pad)

    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    d.rectangle([pad, pad, W - pad, H - pad], outline=(180, 180, 180))
    d.line([xy(s, v) for s, v in pts], fill=(160, 190, 230), width=1)
    windows = [losses[max(0, i - smooth + 1):i + 1] for i in range(len(losses))]
    avg = [sum(w) / len(w) for w in windows]
    d.line([xy(s, v) for s, v in zip(steps, avg)], fill=(20, 60, 160), width=2)
    d.text((pad, 10), f"training loss (moving average of {smooth})", fill="black")
    d.text((5, pad - 5), f"{hi:.4g}", fill="black")
    d.text((5, H - pad - 5), f"{lo:.4g}", fill="black")
    d.text((pad, H - pad + 10), f"step {s0}", fill="black")
    d.text((W - pad - 60, H - pad + 10), f"step {s1}", fill="black")
    im.save(out)
    return out
