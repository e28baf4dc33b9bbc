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
                               "metrics go to %s only", self.path, extra=FILE_ONLY)
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


def run_history(logs_root: Path) -> list[dict]:
    """The whole run's training records across its `logs/<time>/metrics.jsonl` files, in step order.

    A resumed run starts a new log folder at its checkpoint's step; where folders overlap (steps
    trained after the checkpoint by a run that was then interrupted), the later folder's records win.
    Unreadable lines are skipped."""
    by_step: dict[tuple[int, str], dict] = {}
    for folder in sorted(p for p in logs_root.iterdir() if p.is_dir()) if logs_root.is_dir() else []:
        path = folder / "metrics.jsonl"
        if not path.exists():
            continue
        records = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if isinstance(r, dict) and isinstance(r.get("step"), int):
                records.append(r)
        if records:  # steps this folder trained again replace what an interrupted earlier folder wrote
            first = min(r["step"] for r in records)
            by_step = {k: v for k, v in by_step.items() if k[0] < first}
        for r in records:
            by_step[(r["step"], "val_loss" if "val_loss" in r else "loss")] = r
    return [by_step[k] for k in sorted(by_step)]


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
    val = [(r["step"], r["val_loss"]) for r in records if isinstance(r.get("val_loss"), float)]
    lo, hi = min(losses + [v for _, v in val]), max(losses + [v for _, v in val])
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
    if len(val) > 1:
        d.line([xy(s, v) for s, v in val], fill=(220, 110, 20), width=2)
    for s, v in val:
        x, y = xy(s, v)
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(220, 110, 20))
    d.text((pad, 10), f"training loss (moving average of {smooth})" + ("; held-out val_loss in orange" if val else ""),
           fill="black")
    d.text((5, pad - 5), f"{hi:.4g}", fill="black")
    d.text((5, H - pad - 5), f"{lo:.4g}", fill="black")
    d.text((pad, H - pad + 10), f"step {s0}", fill="black")
    d.text((W - pad - 60, H - pad + 10), f"step {s1}", fill="black")
    im.save(out)
    return out
