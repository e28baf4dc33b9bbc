"""The vote store: SQLite in WAL mode, one append-only row per vote.

A row keeps who voted (rater), when (UTC, ISO 8601), both sources by name and their image files, the
prompt and seed they share, the order shown (`AB`: source A was on the left) and the answer in terms of
the sources (`A`, `B`, `tie`, `both_bad`). Triggers refuse UPDATE and DELETE, so a vote once stored
stays; each vote is its own committed transaction (synchronous=FULL), so a killed server keeps it.
"""

from __future__ import annotations

import csv
import io
import secrets
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path

ANSWERS = ("A", "B", "tie", "both_bad")
COLUMNS = ("id", "time", "rater", "source_a", "source_b", "image_a", "image_b", "prompt", "seed", "pair_id",
           "shown", "answer")

SCHEMA = """
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    rater TEXT NOT NULL,
    source_a TEXT NOT NULL,
    source_b TEXT NOT NULL,
    image_a TEXT NOT NULL,
    image_b TEXT NOT NULL,
    prompt TEXT NOT NULL,
    seed INTEGER,
    pair_id TEXT NOT NULL,
    shown TEXT NOT NULL CHECK (shown IN ('AB', 'BA')),
    answer TEXT NOT NULL CHECK (answer IN ('A', 'B', 'tie', 'both_bad'))
);
CREATE TRIGGER IF NOT EXISTS votes_append_only_update BEFORE UPDATE ON votes
BEGIN SELECT RAISE(ABORT, 'votes are append-only'); END;
CREATE TRIGGER IF NOT EXISTS votes_append_only_delete BEFORE DELETE ON votes
BEGIN SELECT RAISE(ABORT, 'votes are append-only'); END;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class VoteStore:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by the server's worker threads, serialised by a lock; other processes
        # on the same file wait on SQLite's own lock (busy_timeout).
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
        self._lock = threading.Lock()
        with self._lock:
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise sqlite3.OperationalError(f"SQLite refused WAL mode ({mode}); put the file on a local disk")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(SCHEMA)

    def secret(self) -> bytes:
        """A random key kept in the database: it decides the left/right placement, the same after a restart."""
        with self._lock:
            self._conn.execute("INSERT OR IGNORE INTO meta VALUES ('secret', ?)", (secrets.token_hex(32),))
            return bytes.fromhex(self._conn.execute("SELECT value FROM meta WHERE key = 'secret'").fetchone()[0])

    def add(self, *, rater: str, source_a: str, source_b: str, image_a: str, image_b: str, prompt: str,
            seed: int | None, pair_id: str, shown: str, answer: str) -> int:
        if answer not in ANSWERS or shown not in ("AB", "BA"):
            raise ValueError(f"answer must be one of {ANSWERS} and shown AB or BA; got {answer!r}, {shown!r}")
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        with self._lock:
            cur = self._conn.execute(
                "INSERT INTO votes (time, rater, source_a, source_b, image_a, image_b, prompt, seed, pair_id, shown,"
                " answer) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (now, rater, source_a, source_b, image_a, image_b, prompt, seed, pair_id, shown, answer))
            return int(cur.lastrowid)

    def rows(self) -> list[dict]:
        with self._lock:
            cur = self._conn.execute(f"SELECT {', '.join(COLUMNS)} FROM votes ORDER BY id")
            return [dict(zip(COLUMNS, r)) for r in cur.fetchall()]

    def count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM votes").fetchone()[0])

    def rater_counts(self, rater: str, pair_ids: list[str]) -> dict[str, int]:
        """How often `rater` voted on each of these pairs (the next pair shown is one they saw least)."""
        with self._lock:
            cur = self._conn.execute("SELECT pair_id, COUNT(*) FROM votes WHERE rater = ? GROUP BY pair_id", (rater,))
            seen = dict(cur.fetchall())
        return {p: int(seen.get(p, 0)) for p in pair_ids}

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(COLUMNS)
        for r in self.rows():
            w.writerow([r[c] for c in COLUMNS])
        return buf.getvalue()

    def close(self) -> None:
        with self._lock:
            self._conn.close()
