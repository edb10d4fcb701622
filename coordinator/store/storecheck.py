"""What a store's files hold against what its state file says they must: read only."""

from __future__ import annotations

import contextlib
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from shoal.coordinator.store.marks import Marks, found_marks, losses, open_read_only, read_marks
from shoal.errors import FailedPrecondition

__all__ = ["StoreReport", "check_store", "state_path"]


def state_path(store: Path) -> Path:
    """Where the state file of the store at `store` is."""
    return store.with_suffix(".state")


@dataclass(slots=True)
class StoreReport:
    """A store as found: `problems` is empty when it holds all its state file says."""

    path: Path
    expected: Marks | None  # None: no state file (a new store, or one made before them)
    found: Marks = field(default_factory=Marks)
    problems: list[str] = field(default_factory=list)
    # Filled in by a thorough check only:
    integrity: list[str] = field(default_factory=list)  # ["ok"] for a sound file
    tasks: int = 0
    finished: int = 0


def check_store(path: Path, *, thorough: bool = False) -> StoreReport:
    """Compare the store at `path` with its state file, writing nothing (a store found
    damaged is left as it is, for its owner to look at). `thorough` adds SQLite's
    integrity_check and task counts, which read every page: not for a start."""
    state = state_path(path)
    try:
        report = StoreReport(path, read_marks(state))
    except FailedPrecondition as err:
        report = StoreReport(path, None, problems=[err.message])
    holds_data = f"{state.name} says it held data"
    try:
        empty = path.stat().st_size == 0
    except FileNotFoundError:
        if report.expected is not None:
            report.problems.append(f"it is missing, and {holds_data}")
        return report
    if empty:  # SQLite would open it as a new store, and drop what its -wal file holds
        if report.expected is not None:
            report.problems.append(f"it is empty, and {holds_data}")
        return report
    try:
        with contextlib.closing(open_read_only(path)) as conn:
            report.found = found_marks(conn)
            if thorough:
                _look_closer(conn, report)
    except sqlite3.DatabaseError as err:
        report.problems.append(f"it cannot be read ({err})")
        return report
    if report.expected is not None:
        report.problems += losses(report.expected, report.found)
    return report


def _look_closer(conn: sqlite3.Connection, report: StoreReport) -> None:
    report.integrity = [str(r[0]) for r in conn.execute("PRAGMA integrity_check(20)")]
    if report.integrity != ["ok"]:
        report.problems.append("SQLite's integrity_check found damage")
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'tasks'").fetchone():
        report.tasks, report.finished = conn.execute(
            "SELECT count(*), count(final_seq) FROM tasks"
        ).fetchone()
