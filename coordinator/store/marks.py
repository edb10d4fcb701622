"""The store's marks: what a restart must find in it, kept in a state file beside it.

SQLite keeps its latest commits in the -wal file until a checkpoint: a deleted, truncated or
garbled WAL, or a database replaced by an older copy, opens as a valid store that silently
lacks acknowledged tasks. The state file is written apart from SQLite (temp file, fsync,
rename, fsync of the directory), so whatever happens to the store's files, it says what the
store held at least: its epoch (which therefore never repeats) and its last acceptance and
outcome sequence numbers.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path

from shoal.coordinator.store.base import EPOCH_SHIFT
from shoal.errors import FailedPrecondition

__all__ = [
    "Marks",
    "found_marks",
    "losses",
    "open_read_only",
    "read_marks",
    "seq_text",
    "write_marks",
]


@dataclass(frozen=True, slots=True)
class Marks:
    """How far a store got: its epoch, and its last acceptance and outcome seq (0: none)."""

    epoch: int = 0
    accepted: int = 0
    finished: int = 0

    def at_least(self, other: Marks) -> Marks:
        """Each mark the greater of the two (marks never go back)."""
        return Marks(
            max(self.epoch, other.epoch),
            max(self.accepted, other.accepted),
            max(self.finished, other.finished),
        )


def seq_text(seq: int) -> str:
    """A sequence number as people read it: number N of epoch E."""
    return f"{seq & ((1 << EPOCH_SHIFT) - 1)} of epoch {seq >> EPOCH_SHIFT}" if seq else "none"


def open_read_only(path: Path) -> sqlite3.Connection:
    """A connection that cannot change the store (nor checkpoint its WAL when it closes)."""
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)


def found_marks(conn: sqlite3.Connection) -> Marks:
    """The marks of the store behind `conn` (all 0 for an empty one); each read is an index
    lookup, so this costs the same for a million tasks as for none."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    epoch = accepted = finished = 0
    if "meta" in tables:
        row = conn.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        epoch = int(row[0]) if row else 0
    if "tasks" in tables:
        accepted = conn.execute("SELECT max(seq) FROM tasks").fetchone()[0] or 0
        finished = (
            conn.execute("SELECT max(final_seq) FROM tasks WHERE final_seq IS NOT NULL").fetchone()[
                0
            ]
            or 0
        )
    return Marks(epoch, accepted, finished)


def losses(expected: Marks, found: Marks) -> list[str]:
    """What `found` lacks of `expected`, one phrase each (empty: nothing)."""
    out = []
    if found.epoch < expected.epoch:
        out.append(f"its epoch is {found.epoch}, not at least {expected.epoch}")
    if found.accepted < expected.accepted:
        out.append(
            f"its last accepted task is {seq_text(found.accepted)},"
            f" not at least {seq_text(expected.accepted)}"
        )
    if found.finished < expected.finished:
        out.append(
            f"its last outcome is {seq_text(found.finished)},"
            f" not at least {seq_text(expected.finished)}"
        )
    return out


_FIELDS = ("epoch", "accepted", "finished")


def read_marks(path: Path) -> Marks | None:
    """The marks in the state file at `path`; None when there is none.

    FailedPrecondition when it cannot be read or holds anything but the marks.
    """
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise FailedPrecondition(f"cannot read the state file {path}: {err.strerror}") from None
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or set(data) != set(_FIELDS):
            raise ValueError("not the marks")
        values = [data[name] for name in _FIELDS]
        if not all(type(v) is int and 0 <= v < 1 << 63 for v in values):
            raise ValueError("not the marks")
    except ValueError:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise FailedPrecondition(f"its state file {path.name} is damaged") from None
    return Marks(*values)


def write_marks(path: Path, marks: Marks) -> None:
    """Replace the state file at `path` atomically and durably (a crash leaves the old or
    the new one); raises OSError when it cannot (a full disk)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps(asdict(marks)).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power loss
    finally:
        os.close(dir_fd)
