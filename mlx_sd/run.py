"""A training run's output folder: owned by one run at a time, never silently reused.

`open_run` takes the folder's lock (`.lock`: pid, host, start time; a lock whose process is gone
is taken over, one held elsewhere is named), refuses a folder that already holds a run unless the
user resumes it (`--resume_from_checkpoint`) or asks to replace it (`--overwrite`, which moves the
old outputs into `replaced-<time>/`; nothing is deleted), and makes the run's log folder
`logs/<time>/`. Only rank 0 of a data-parallel run touches the folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from .errors import MlxSdError
from .logs import setup_logging

LOCK = ".lock"
# What a run leaves in its folder; `cache/` is keyed by content and shared by runs, so it stays.
OUTPUTS = ("checkpoints", "lora_weights", "validation", "final_pipeline", "logs")


class RunError(MlxSdError):
    pass


class Interrupted(MlxSdError):
    """SIGINT/SIGTERM before training started; `exit_code` is the shell's 128 + signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@contextmanager
def stop_on_signal(what: str, lost: str):
    """Ctrl-C or SIGTERM while doing `what` ends the run at once, saying what is `lost`."""
    got = []

    def handle(signum, frame):
        got.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    except KeyboardInterrupt:
        name = "SIGTERM" if got else "SIGINT"
        raise Interrupted(f"{name} while {what}: {lost}", 143 if got else 130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class RunLock:
    """An exclusive lock on a folder for this process; a crashed run's lock is detected as stale."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK
        self.held = False

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.now().isoformat(timespec="seconds")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._clear_stale()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
            self.held = True
            return
        raise RunError(f"{self.path}: could not take the lock of {self.path.parent}")

    def _clear_stale(self) -> bool:
        """Remove the lock if its owner is gone; raise if it is alive (or cannot be checked)."""
        try:
            owner = json.loads(self.path.read_text())
            pid, host = int(owner["pid"]), str(owner["host"])
        except FileNotFoundError:
            return True
        except (OSError, ValueError, KeyError, TypeError):
            if time.time() - self.path.stat().st_mtime < 10:  # being written right now
                time.sleep(0.5)
                return False
            owner, pid, host = {}, None, None  # unreadable and old: left by a crash while being written
        folder = self.path.parent
        if pid is not None and host == socket.gethostname() and _alive(pid):
            raise RunError(f"{folder} is in use by another training (pid {pid}, started {owner.get('started')}). "
                           "Wait for it to finish, stop it, or train into another --output_dir.")
        if pid is not None and host != socket.gethostname():
            raise RunError(f"{folder} is locked by a training on host {host} (pid {pid}, started "
                           f"{owner.get('started')}). If no training runs there any more, delete {self.path}.")
        self.path.unlink(missing_ok=True)  # its process is gone: a crash or a kill
        return True

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def previous_run(out: Path) -> str | None:
    """What of an earlier run `out` holds, in words; None if nothing."""
    ckpts = sorted((int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*")
                    if p.name.split("-")[1].isdigit()), reverse=True)
    parts = []
    if ckpts:
        parts.append(f"checkpoints up to step {ckpts[0]}")
    if (out / "lora_weights").is_dir() and any((out / "lora_weights").iterdir()):
        parts.append("a finished adapter in lora_weights/")
    return " and ".join(parts) or None


def move_aside(out: Path) -> Path:
    """Move a previous run's outputs into `out/replaced-<time>/` (nothing is deleted)."""
    dest = out / f"replaced-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while dest.exists():
        n += 1
        dest = out / f"replaced-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{n}"
    dest.mkdir()
    for name in OUTPUTS:
        if (out / name).exists():
            os.replace(out / name, dest / name)
    return dest


@dataclass
class Run:
    """Where this run writes, and who speaks: only rank 0 prints progress and writes outputs."""

    out: Path
    logs: Path
    main: bool = True
    progress: bool = True
    started: bool = False  # set once training begins: a run that fails before keeps no log folder
    lock: RunLock | None = field(default=None, repr=False)

    def say(self, *a, **k) -> None:
        if self.main:
            print(*a, **k)

    def close(self) -> None:
        root = logging.getLogger()
        for h in [h for h in root.handlers if isinstance(h, logging.FileHandler)
                  and Path(h.baseFilename).parent == self.logs]:
            h.close()
            root.removeHandler(h)
        if self.main and not self.started and self.logs.is_dir():
            shutil.rmtree(self.logs, ignore_errors=True)  # nothing trained: the printed error is the record
            for empty in (self.logs.parent,):
                if empty.is_dir() and not any(empty.iterdir()):
                    empty.rmdir()
        if self.lock:
            self.lock.release()


def open_run(out_dir: str | Path, main: bool = True, resume: str | None = None, overwrite: bool = False,
             reuse: bool = False, progress: bool = True) -> Run:
    """Take `out_dir` for a new run, or for resuming the one in it (`resume`); see the module docstring.

    `reuse` (the --check mode, which writes no checkpoint) skips the refusal of a folder with a run in it.
    """
    out = Path(out_dir).expanduser()
    run = Run(out, out / "logs" / datetime.now().strftime("%Y%m%d-%H%M%S"), main=main, progress=progress and main)
    if not main:
        logging.getLogger().addHandler(logging.NullHandler())  # rank 0 logs for the run
        return run
    if out.exists() and not out.is_dir():
        raise RunError(f"--output_dir {out} is a file, not a folder; choose a folder path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"--output_dir {out}: cannot create the folder ({e.strerror})") from None
    run.lock = RunLock(out)
    run.lock.acquire()
    try:
        earlier = previous_run(out)
        if earlier and not (resume or reuse):
            if not overwrite:
                raise RunError(
                    f"--output_dir {out} already holds a run ({earlier}). Continue it with "
                    "--resume_from_checkpoint latest, train into a new --output_dir, or pass --overwrite to move "
                    f"its outputs into {out}/replaced-<time>/ (nothing is deleted).")
            run.say(f"--overwrite: the previous run's outputs are now in {move_aside(out)}")
        n = 1
        while run.logs.exists():  # two runs started in the same second
            n += 1
            run.logs = run.logs.with_name(f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{n}")
        setup_logging(run.logs)
    except BaseException:
        run.close()
        raise
    return run
