"""The store's writer thread: group commit, and the records that ride along with it."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from shoal.coordinator.store import writer
from shoal.coordinator.store.writer import Batch, Results, SqliteWriter


class Counted(SqliteWriter):
    """A writer that notes the operations of each transaction it commits."""

    def __init__(self, path: Path) -> None:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("CREATE TABLE t (v TEXT)")
        super().__init__(conn, asyncio.get_running_loop())
        self.commits: list[list[str]] = []

    def _commit(self, batch: Batch) -> Results:
        self.commits.append([getattr(op, "name", "?") for op, _ in batch])
        return super()._commit(batch)


def insert(name: str) -> Any:
    def op(c: sqlite3.Connection) -> str:
        c.execute("INSERT INTO t VALUES (?)", (name,))
        return name

    op.name = name  # type: ignore[attr-defined]
    return op


async def test_records_ride_along_with_the_next_commit_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer, "RIDE_ALONG", 60.0)  # they would wait a minute for company
    w = Counted(tmp_path / "w.db")
    w.start()
    try:
        first = w.submit(insert("dispatched-1"), ride_along=True)
        second = w.submit(insert("dispatched-2"), ride_along=True)
        answer = await w.submit(insert("outcome"))
        assert answer == "outcome"
        assert await first == "dispatched-1" and await second == "dispatched-2"
        assert w.commits == [["dispatched-1", "dispatched-2", "outcome"]]  # one commit, in order
    finally:
        w.stop()
        await asyncio.to_thread(w.join)


async def test_a_record_alone_is_committed_after_a_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer, "RIDE_ALONG", 0.01)
    w = Counted(tmp_path / "w.db")
    w.start()
    try:
        assert await w.submit(insert("dispatched"), ride_along=True) == "dispatched"
        assert w.commits == [["dispatched"]]
    finally:
        w.stop()
        await asyncio.to_thread(w.join)


async def test_stopping_commits_what_rides_along(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer, "RIDE_ALONG", 60.0)
    w = Counted(tmp_path / "w.db")
    w.start()
    pending = w.submit(insert("dispatched"), ride_along=True)
    w.stop()
    await asyncio.to_thread(w.join)
    assert await pending == "dispatched"
    assert w.commits == [["dispatched"]]
    db = sqlite3.connect(tmp_path / "w.db")
    assert db.execute("SELECT v FROM t").fetchall() == [("dispatched",)]
    db.close()


async def test_a_cursor_an_operation_returns_stays_in_the_writers_thread(tmp_path: Path) -> None:
    """A cursor freed in the caller's thread would reset its statement while the writer runs
    the next on the same connection: SQLite's "bad parameter or other API misuse"."""
    w = Counted(tmp_path / "w.db")
    w.start()
    try:
        rows = [(str(i),) for i in range(50)]
        ops = [
            w.submit(lambda c: c.executemany("INSERT INTO t VALUES (?)", rows), ride_along=True)
            for _ in range(200)
        ]
        assert await asyncio.gather(*ops) == [None] * 200
    finally:
        w.stop()
        await asyncio.to_thread(w.join)
