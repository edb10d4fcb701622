"""The PostgreSQL backend of the Store: several coordinators on one database, one leading."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import psycopg

from shoal.coordinator.store.conn import Op
from shoal.coordinator.store.leadership import Leader, Leadership
from shoal.coordinator.store.pgschema import migrate
from shoal.coordinator.store.pgwriter import PgConn, PgWriter, connect
from shoal.coordinator.store.rows import Request, TaskRow
from shoal.coordinator.store.sqlstore import SqlStore
from shoal.errors import FailedPrecondition, Unavailable

__all__ = ["PostgresStore", "is_postgres_url", "redacted", "request_key"]

_log = logging.getLogger("shoal.coordinator")


def is_postgres_url(store: str) -> bool:
    """Whether a `store` setting names a PostgreSQL database."""
    return store.startswith(("postgresql://", "postgres://"))


def request_key(key: str) -> str:
    """A request key as PostgreSQL stores it: the core joins caller and id with NUL, which a
    TEXT column refuses, so backslash and NUL are escaped (one to one)."""
    return key.replace("\\", "\\\\").replace("\0", "\\0")


def redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    with contextlib.suppress(Exception):
        info = psycopg.conninfo.conninfo_to_dict(url)
        host, port, db = info.get("host", ""), info.get("port", ""), info.get("dbname", "")
        return f"postgresql://{info.get('user', '')}@{host}{':' if port else ''}{port}/{db}"
    return "postgresql://…"


class PostgresStore(SqlStore):
    """PostgreSQL: `open` waits until this process leads (standing by meanwhile: `leader`
    says who does), then writes through one writer thread, each batch fenced by its epoch."""

    _DISPATCHED_ORDER = "id"

    def __init__(
        self,
        url: str,
        *,
        address: str = "",
        lease: timedelta = timedelta(seconds=3),
        poll: timedelta = timedelta(milliseconds=500),
    ) -> None:
        self._url = url
        self._poll = poll
        self.leadership = Leadership(url, holder=uuid.uuid4().hex, address=address, ttl=lease)
        self.on_lost: Callable[[str], None] = lambda reason: None
        """Called (on the loop) once this process no longer leads: it must stop serving."""
        self._writer: PgWriter | None = None
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shoal-store-reader")
        self._reader_conn: psycopg.Connection[Any] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._lost = False

    @property
    def leader(self) -> Leader | None:
        """Who leads, as last seen (this process once it does)."""
        return self.leadership.leader

    async def migrate(self) -> tuple[int, int]:
        """Bring the schema up to date: (version found, version now)."""
        try:
            found: tuple[int, int] = await self._run(migrate)
            return found
        except psycopg.Error as err:
            raise Unavailable(f"cannot migrate the store {redacted(self._url)}: {err}") from None
        except RuntimeError as err:
            raise FailedPrecondition(f"the store {redacted(self._url)}: {err}") from None

    async def open(self) -> int:
        try:
            await self.migrate()
            epoch: int = await self.leadership.acquire(self._poll)
            conn = await asyncio.to_thread(connect, self._url)
        except BaseException:
            await self.close()
            raise
        _log.info("leading on %s with epoch %d", redacted(self._url), epoch)
        loop = asyncio.get_running_loop()
        self._writer = PgWriter(
            self._url, conn, epoch, loop, lambda: self._lose("another coordinator took over")
        )
        self._writer.start()
        self._keeper = asyncio.create_task(self.leadership.keep(self._lose), name="shoal-lease")
        return epoch

    def _lose(self, reason: str) -> None:
        if not self._lost:
            self._lost = True
            _log.error("this coordinator no longer leads: %s", reason)
            self.on_lost(reason)

    async def close(self) -> None:
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.stop()
            await asyncio.to_thread(writer.join)
        await self.leadership.release()
        if self._reader_conn is not None:
            await self._run(lambda _: self._close_reader())
        self._reader.shutdown(wait=True)

    def _close_reader(self) -> None:
        conn, self._reader_conn = self._reader_conn, None
        if conn is not None:
            conn.close()

    async def insert(
        self, rows: Sequence[TaskRow], request: Request | None = None
    ) -> tuple[list[str | None], list[list[str]]]:
        if request is not None:  # the core joins caller and id with NUL, which TEXT refuses
            request = Request(request_key(request.key), request.created_at)
        return await super().insert(rows, request)

    def _write(self, op: Op, *, ride_along: bool = False) -> asyncio.Future[Any]:
        if self._writer is None:
            raise Unavailable("the store is closed")
        fut: asyncio.Future[Any] = self._writer.submit(op, ride_along=ride_along)
        return fut

    async def _read(self, fn: Callable[[Any], Any]) -> Any:
        return await self._run(lambda raw: fn(PgConn(raw)))

    async def _run(self, fn: Callable[[psycopg.Connection[Any]], Any]) -> Any:
        """Run `fn` on the reader's connection, in the reader's thread."""

        def call() -> Any:
            if self._reader_conn is None or self._reader_conn.closed:
                self._reader_conn = connect(self._url)
            try:
                return fn(self._reader_conn)
            except psycopg.OperationalError as err:
                if self._reader_conn.closed:
                    self._reader_conn = None
                raise Unavailable(f"store read failed: {err}") from None

        return await asyncio.get_running_loop().run_in_executor(self._reader, call)
