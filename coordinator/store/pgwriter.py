"""PostgreSQL's group commit: one pipelined transaction per batch, fenced by the epoch."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import psycopg

from shoal.coordinator.store.writer import Batch, Results, Writer
from shoal.errors import InvalidArgument, Unavailable

__all__ = ["FENCED", "OPTIONS", "PgConn", "PgWriter", "connect"]

FENCED = "SH001"
"""The SQLSTATE shoal_fence raises: another coordinator leads now."""

# The connection notices a dead server or a cut network within seconds (TCP keepalive, and a
# send that goes unacknowledged), and the server ends a transaction whose client went quiet:
# a partitioned leader then holds no lock a takeover would wait on.
OPTIONS: dict[str, Any] = {
    "connect_timeout": 3,
    "keepalives": 1,
    "keepalives_idle": 1,
    "keepalives_interval": 1,
    "keepalives_count": 2,
    "tcp_user_timeout": 3000,
    "options": "-c idle_in_transaction_session_timeout=2000",
}


def connect(url: str) -> psycopg.Connection[Any]:
    """A connection in autocommit mode (transactions are explicit) with the options above."""
    return psycopg.connect(url, autocommit=True, **OPTIONS)


@functools.lru_cache(maxsize=256)
def _placeholders(sql: str) -> str:
    # The statements hold no `?` nor `%` of their own: only their parameters' places.
    return sql.replace("?", "%s")


class PgConn:
    """A psycopg connection that takes the statements as SQLite does (`?` placeholders)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.raw = conn

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> psycopg.Cursor[Any]:
        return self.raw.execute(_placeholders(sql), parameters or None)

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Any:
        cursor = self.raw.cursor()
        cursor.executemany(_placeholders(sql), parameters)
        return cursor


class PgWriter(Writer):
    """Each batch is one transaction sent as one pipeline (one round trip when no operation
    reads), begun by the epoch's fence; an operation that fails sends the batch again one
    savepoint per operation, so that only it fails."""

    def __init__(
        self,
        url: str,
        conn: psycopg.Connection[Any],
        epoch: int,
        loop: asyncio.AbstractEventLoop,
        on_fenced: Callable[[], None],
    ) -> None:
        super().__init__(loop)
        self._url = url
        self._conn: psycopg.Connection[Any] | None = conn
        self._epoch = epoch
        self._on_fenced = on_fenced
        self._fenced = False

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def _commit(self, batch: Batch) -> Results:
        if self._fenced:
            return _all_fail(batch, _deposed(self._epoch))
        try:
            if self._conn is None or self._conn.closed:
                self._conn = connect(self._url)
            try:
                return self._pipelined(self._conn, batch)
            except Exception as err:
                if _is_fenced(err) or self._conn.closed:
                    raise
            return self._one_by_one(self._conn, batch)
        except Exception as err:
            if _is_fenced(err):
                self._fenced = True
                self._loop.call_soon_threadsafe(self._on_fenced)
                return _all_fail(batch, _deposed(self._epoch))
            if self._conn is not None and self._conn.closed:
                self._conn = None  # the next batch connects again
            return _all_fail(batch, Unavailable(f"store write failed: {err}"))

    def _pipelined(self, conn: psycopg.Connection[Any], batch: Batch) -> Results:
        pg = PgConn(conn)
        with conn.pipeline(), conn.transaction():
            conn.execute("SELECT shoal_fence(%s)", (self._epoch,))
            values = [op(pg) for op, _ in batch]
        return [(fut, value, None) for (_, fut), value in zip(batch, values, strict=True)]

    def _one_by_one(self, conn: psycopg.Connection[Any], batch: Batch) -> Results:
        pg = PgConn(conn)
        results: Results = []
        with conn.transaction():
            conn.execute("SELECT shoal_fence(%s)", (self._epoch,))
            for op, fut in batch:
                try:
                    with conn.transaction():  # a savepoint
                        results.append((fut, op(pg), None))
                except Exception as err:  # its own failure (a refusal, a constraint): its caller's
                    if conn.closed:
                        raise
                    if isinstance(err, psycopg.DataError):  # text with NUL, a number out of range
                        err = InvalidArgument(f"the store cannot hold this value: {err}")
                    results.append((fut, None, err))
        return results


def _is_fenced(err: BaseException) -> bool:
    return isinstance(err, psycopg.Error) and err.sqlstate == FENCED


def _deposed(epoch: int) -> Unavailable:
    return Unavailable(f"this coordinator (epoch {epoch}) no longer leads: another one took over")


def _all_fail(batch: Batch, err: BaseException) -> Results:
    return [(fut, None, err) for _, fut in batch]
