"""The store's one writer thread: group commit (SQLite's here, PostgreSQL's in pgwriter)."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from datetime import timedelta
from typing import Any

from shoal.coordinator.store.base import STORE_FULL
from shoal.coordinator.store.conn import Op
from shoal.errors import ResourceExhausted, ShoalError, Unavailable

__all__ = ["Batch", "Results", "SqliteWriter", "Writer"]

_FULL_RETRY = timedelta(seconds=5)  # freeing space takes an operator: not a quick resend

Batch = list[tuple[Op, "asyncio.Future[Any]"]]
Results = list[tuple["asyncio.Future[Any]", Any, BaseException | None]]


class Writer(threading.Thread):
    """The one writer: takes every queued operation, runs them in one transaction, commits once."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(name="shoal-store-writer", daemon=True)
        self._loop = loop
        self._queue: queue.SimpleQueue[tuple[Op, asyncio.Future[Any]] | None] = queue.SimpleQueue()

    def submit(self, op: Op) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._queue.put((op, fut))
        return fut

    def stop(self) -> None:
        self._queue.put(None)

    def _commit(self, batch: Batch) -> Results:
        """Run the batch in one transaction: each operation's result or failure."""
        raise NotImplementedError

    def _close(self) -> None:
        """Close the connection (in the writer's thread, after the last commit)."""
        raise NotImplementedError

    def run(self) -> None:
        while True:
            item = self._queue.get()
            batch: Batch = []
            stopping = item is None
            if item is not None:
                batch.append(item)
            while not stopping:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                else:
                    batch.append(nxt)
            if batch:
                self._loop.call_soon_threadsafe(_deliver, self._commit(batch))
            if stopping:
                self._close()
                return


class SqliteWriter(Writer):
    """SQLite's group commit: a savepoint per operation, one COMMIT (one fsync) per batch."""

    def __init__(self, conn: sqlite3.Connection, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._conn = conn

    def _close(self) -> None:
        self._conn.close()

    def _commit(self, batch: Batch) -> Results:
        conn = self._conn
        results: Results = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op, fut in batch:
                # A savepoint per operation: one failing operation leaves the others intact.
                conn.execute("SAVEPOINT op")
                try:
                    results.append((fut, op(conn), None))
                    conn.execute("RELEASE op")
                except Exception as err:  # its own failure (a refusal, a constraint): its caller's
                    if not conn.in_transaction:  # SQLite undid them all (SQLITE_FULL may)
                        raise
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((fut, None, _full(err) or err))
            conn.execute("COMMIT")
        except sqlite3.Error as err:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):  # the batch fails either way
                    conn.execute("ROLLBACK")
            failure = _full(err) or Unavailable(f"store write failed: {err}")
            return [(fut, None, failure) for _, fut in batch]
        return results


def _full(err: Exception) -> ShoalError | None:
    """RESOURCE_EXHAUSTED for a write that failed for want of disk space (SQLite reports
    ENOSPC as SQLITE_FULL): it works again once space is freed, so callers may retry."""
    if isinstance(err, sqlite3.Error) and err.sqlite_errorcode & 0xFF == sqlite3.SQLITE_FULL:
        return ResourceExhausted(f"{STORE_FULL} ({err})", retry_after=_FULL_RETRY)
    return None


def _deliver(results: Results) -> None:
    for fut, value, err in results:
        if fut.cancelled():
            continue
        if err is not None:
            fut.set_exception(err)
        else:
            fut.set_result(value)
