"""The vote store: SQLite in WAL mode, one append-only row per vote.

A row keeps who voted (rater), when (UTC, ISO 8601), both sources by name and their image files, the
prompt and seed they share, the order shown (`AB`: source A was on the left) and the answer in terms of
the sources (`A`, `B`, `tie`, `both_bad`). Triggers refuse UPDATE and DELETE, so a vote once stored
stays; each vote is its own committed transaction (synchronous=FULL), so a killed server keeps it.

Each pair the page is shown carries a nonce the server issued (table `nonces`); a vote must bring one
that was issued for that pair and not used yet, and uses it in the same transaction that stores the
vote, so a vote posted twice is stored once. Undoing a vote appends a row to `undone`: the vote stays
in the file (and in the CSV, marked) but no longer counts.
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
# The CSV names what A and B mean in its header: A is always source_a, whichever side it was shown on.
CSV_HEADER = (*COLUMNS[:10], "shown (AB: source_a on the left)", "answer (A: source_a, B: source_b)", "winner",
              "undone")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


class NonceError(ValueError):
    """A vote whose nonce this server never issued for that pair, or one already used."""

    def __init__(self, msg: str, status: int):
        super().__init__(msg)
        self.status = status


def csv_cell(v):
    """A cell a spreadsheet shows as text: one starting with = + - @ would run as a formula (CWE-1236)."""
    return "'" + v if isinstance(v, str) and v.startswith(FORMULA_START) else v

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
CREATE TABLE IF NOT EXISTS nonces (
    nonce TEXT PRIMARY KEY,
    pair_id TEXT NOT NULL,
    source_a TEXT NOT NULL,
    source_b TEXT NOT NULL,
    issued TEXT NOT NULL,
    vote_id INTEGER
);
CREATE TABLE IF NOT EXISTS undone (vote_id INTEGER PRIMARY KEY, time TEXT NOT NULL);
"""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


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

    def issue(self, pair_id: str, source_a: str, source_b: str) -> str:
        """A new nonce for showing this pair of these two sources once."""
        nonce = secrets.token_hex(8)
        with self._lock:
            self._conn.execute("INSERT INTO nonces (nonce, pair_id, source_a, source_b, issued)"
                               " VALUES (?, ?, ?, ?, ?)", (nonce, pair_id, source_a, source_b, _now()))
        return nonce

    def issued(self, nonce: str, pair_id: str, source_a: str, source_b: str) -> bool:
        with self._lock:
            row = self._conn.execute("SELECT pair_id, source_a, source_b FROM nonces WHERE nonce = ?",
                                     (nonce,)).fetchone()
        return row == (pair_id, source_a, source_b)

    def add(self, *, nonce: str, source_a_id: str, source_b_id: str, rater: str, source_a: str, source_b: str,
            image_a: str, image_b: str, prompt: str, seed: int | None, pair_id: str, shown: str, answer: str) -> int:
        """Stores a vote and uses up its nonce, both or neither; NonceError when the nonce is unknown or used."""
        if answer not in ANSWERS or shown not in ("AB", "BA"):
            raise ValueError(f"answer must be one of {ANSWERS} and shown AB or BA; got {answer!r}, {shown!r}")
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                row = self._conn.execute("SELECT pair_id, source_a, source_b, vote_id FROM nonces WHERE nonce = ?",
                                         (nonce,)).fetchone()
                if row is None or row[:3] != (pair_id, source_a_id, source_b_id):
                    raise NonceError("this pair was not offered by this studio (or not for these sources): "
                                     "ask for the next pair and vote on that", 400)
                if row[3] is not None:
                    raise NonceError(f"this pair was already voted on (vote {row[3]}); each showing counts once", 409)
                cur = self._conn.execute(
                    "INSERT INTO votes (time, rater, source_a, source_b, image_a, image_b, prompt, seed, pair_id,"
                    " shown, answer) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (_now(), rater, source_a, source_b, image_a, image_b, prompt, seed, pair_id, shown, answer))
                vote_id = int(cur.lastrowid)
                self._conn.execute("UPDATE nonces SET vote_id = ? WHERE nonce = ?", (vote_id, nonce))
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            return vote_id

    def undo(self, nonce: str) -> int:
        """Marks the vote cast with this nonce as undone (the row stays); returns its id."""
        with self._lock:
            row = self._conn.execute("SELECT vote_id FROM nonces WHERE nonce = ?", (nonce,)).fetchone()
            if row is None or row[0] is None:
                raise NonceError("no vote was cast with this nonce", 404)
            if self._conn.execute("INSERT OR IGNORE INTO undone VALUES (?, ?)", (row[0], _now())).rowcount == 0:
                raise NonceError(f"vote {row[0]} is already undone", 409)
            return int(row[0])

    def rows(self, undone: bool = False) -> list[dict]:
        """Votes in order; undone ones only with `undone=True` (then with their `undone` time)."""
        sql = (f"SELECT {', '.join('v.' + c for c in COLUMNS)}, u.time"
               " FROM votes v LEFT JOIN undone u ON u.vote_id = v.id"
               + ("" if undone else " WHERE u.vote_id IS NULL") + " ORDER BY v.id")
        with self._lock:
            rows = self._conn.execute(sql).fetchall()
        return [dict(zip((*COLUMNS, "undone"), r)) for r in rows]

    def count(self) -> int:
        with self._lock:
            return int(self._conn.execute(
                "SELECT COUNT(*) FROM votes WHERE id NOT IN (SELECT vote_id FROM undone)").fetchone()[0])

    def rater_counts(self, rater: str, pair_ids: list[str]) -> dict[str, int]:
        """How often `rater` voted on each of these pairs (the next pair shown is one they saw least)."""
        with self._lock:
            cur = self._conn.execute("SELECT pair_id, COUNT(*) FROM votes WHERE rater = ? AND id NOT IN "
                                     "(SELECT vote_id FROM undone) GROUP BY pair_id", (rater,))
            seen = dict(cur.fetchall())
        return {p: int(seen.get(p, 0)) for p in pair_ids}

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_HEADER)
        for r in self.rows(undone=True):
            winner = {"A": r["source_a"], "B": r["source_b"]}.get(r["answer"], "")
            w.writerow([csv_cell(r[c]) for c in COLUMNS] + [csv_cell(winner), r["undone"] or ""])
        return buf.getvalue()

    def close(self) -> None:
        with self._lock:
            self._conn.close()
