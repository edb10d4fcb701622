"""The store's one writer thread: group commit (SQLite's here, PostgreSQL's in pgwriter)."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
import time
from datetime import timedelta
from typing import Any

from shoal.coordinator.store.base import STORE_FULL
from shoal.coordinator.store.conn import Op
from shoal.errors import ResourceExhausted, ShoalError, Unavailable

__all__ = ["Batch", "Results", "SqliteWriter", "Writer"]

_FULL_RETRY = timedelta(seconds=5)  # freeing space takes an operator: not a quick resend
# How long an operation that rides along (nobody waits for it) waits for one that is awaited,
# so that an idle store commits (and fsyncs) once per call, not once more for it.
RIDE_ALONG = 0.2

Batch = list[tuple[Op, "asyncio.Future[Any]"]]
_Item = tuple[Op, "asyncio.Future[Any]", bool]  # the operation, its future, whether it rides along
Results = list[tuple["asyncio.Future[Any]", Any, BaseException | None]]


class Writer(threading.Thread):
    """The one writer: takes every queued operation, runs them in one transaction, commits once.

    An operation submitted with `ride_along` (a record nobody waits for) does not start a
    commit of its own: it goes with the next one, or within RIDE_ALONG seconds.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(name="shoal-store-writer", daemon=True)
        self._loop = loop
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()

    def submit(self, op: Op, *, ride_along: bool = False) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._queue.put((op, fut, ride_along))
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
            batch, stopping = self._take()
            if batch:
                self._loop.call_soon_threadsafe(_deliver, self._commit(batch))
            if stopping:
                self._close()
                return

    def _take(self) -> tuple[Batch, bool]:
        """The next batch, in the order queued, and whether to stop after it: all that is
        queued once an operation in it is awaited, or once RIDE_ALONG has passed."""
        batch: Batch = []
        awaited = False
        deadline = 0.0
        while True:
            try:
                if awaited:
                    item = self._queue.get_nowait()
                elif batch:  # only operations that ride along: wait for company, a while
                    item = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
                else:
                    item = self._queue.get()
            except queue.Empty:
                return batch, False
            if item is None:
                return batch, True
            op, fut, ride_along = item
            batch.append((op, fut))
            awaited = awaited or not ride_along
            if len(batch) == 1:
                deadline = time.monotonic() + RIDE_ALONG


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
                    value = op(conn)
                    if isinstance(value, sqlite3.Cursor):
                        # Let go of here, in this thread: a cursor freed in another (its
                        # caller's) resets its statement while this one runs the next, which
                        # SQLite reports as API misuse.
                        value.close()
                        value = None
                    results.append((fut, value, None))
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
