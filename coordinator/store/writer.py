"""The store's one writer thread: group commit, a savepoint per operation."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from shoal.coordinator.store.base import STORE_FULL
from shoal.errors import ResourceExhausted, ShoalError, Unavailable

__all__ = ["Op", "Writer"]

_FULL_RETRY = timedelta(seconds=5)  # freeing space takes an operator: not a quick resend

Op = Callable[[sqlite3.Connection], Any]


class Writer(threading.Thread):
    """The one writer: takes every queued operation, runs them in one transaction, commits once."""

    def __init__(self, conn: sqlite3.Connection, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(name="shoal-store-writer", daemon=True)
        self._conn = conn
        self._loop = loop
        self._queue: queue.SimpleQueue[tuple[Op, asyncio.Future[Any]] | None] = queue.SimpleQueue()

    def submit(self, op: Op) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._queue.put((op, fut))
        return fut

    def stop(self) -> None:
        self._queue.put(None)

    def run(self) -> None:
        conn = self._conn
        while True:
            item = self._queue.get()
            batch: list[tuple[Op, asyncio.Future[Any]]] = []
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
                self._loop.call_soon_threadsafe(_deliver, self._commit(conn, batch))
            if stopping:
                conn.close()
                return

    @staticmethod
    def _commit(
        conn: sqlite3.Connection, batch: list[tuple[Op, asyncio.Future[Any]]]
    ) -> list[tuple[asyncio.Future[Any], Any, BaseException | None]]:
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
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


def _deliver(results: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for fut, value, err in results:
        if fut.cancelled():
            continue
        if err is not None:
            fut.set_exception(err)
        else:
            fut.set_result(value)
