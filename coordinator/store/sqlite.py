"""The embedded SQLite backend of the Store: WAL, one writer thread, group commit."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import sqlite3
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

from shoal.coordinator.store.base import EPOCH_SHIFT, Store
from shoal.coordinator.store.dirlock import DirLock
from shoal.coordinator.store.marks import Marks, found_marks, write_marks
from shoal.coordinator.store.rows import (
    FinishedRow,
    Request,
    StoredTask,
    TaskRow,
    TokenRow,
    Unfinished,
    UsageRow,
)
from shoal.coordinator.store.schema import COLUMNS, TOKEN_COLUMNS, migrate, stored_task
from shoal.coordinator.store.storecheck import check_store, state_path
from shoal.coordinator.store.task_writes import finish_op, insert_op
from shoal.coordinator.store.writer import Op, Writer
from shoal.errors import FailedPrecondition, Unavailable

__all__ = ["SqliteStore"]

_log = logging.getLogger("shoal.coordinator")


def _private(path: Path, *, before: bool) -> None:
    """Only the owner may read the store: its directory 0700, the database and its -wal and
    -shm files 0600 (SQLite gives those the database's mode), fixing ones made before; each
    change is logged. `before` opening: the directory and the database; after: all."""
    if before:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # a new store is born private
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        targets = [(path.parent, 0o700), (path, 0o600)]
    else:
        targets = [(Path(f"{path}{suffix}"), 0o600) for suffix in ("", "-wal", "-shm")]
    for target, mode in targets:
        try:
            was = stat.S_IMODE(target.stat().st_mode)
        except FileNotFoundError:
            continue
        if was != mode:
            target.chmod(mode)
            _log.warning(
                "%s was mode %04o, now %04o: only its owner may read it", target, was, mode
            )


_UNFINISHED_PAGE = 20_000  # rows read at a time on a restart


def _bump_epoch(conn: sqlite3.Connection, floor: int) -> int:
    conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', 0)")
    # Past the state file's epoch (`floor`) and every epoch the tasks' numbers carry: whatever
    # the store lost, an epoch is never used twice (attempts are fenced by it).
    conn.execute(
        "UPDATE meta SET value = max(value, ?,"
        " (SELECT coalesce(max(seq), 0) >> ? FROM tasks),"
        " (SELECT coalesce(max(final_seq), 0) >> ? FROM tasks WHERE final_seq IS NOT NULL)"
        ") + 1 WHERE key = 'epoch'",
        (floor, EPOCH_SHIFT, EPOCH_SHIFT),
    )
    return int(conn.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()[0])


def _refusal(path: Path, lost: list[str]) -> str:
    data_dir = shlex.quote(str(path.parent))
    return (
        f"refusing to start on the store {path}: {'; '.join(lost)}. Tasks it acknowledged"
        " may be missing (its -wal file deleted or damaged, or the database replaced or"
        " zeroed?). Restore the data dir from a backup; or see what it holds with"
        f" `shoal store check --data-dir {data_dir}` and go on with that with"
        f" `shoal store accept-loss --data-dir {data_dir}`"
    )


class SqliteStore(Store):
    """SQLite in WAL mode: one writer thread with group commit, one reader thread.

    One process at a time holds it (a lock file beside it). A state file beside it records,
    every `mark_interval`, how far it got; `open` refuses a store that holds less, unless
    `accept_loss` (an operator's decision), which goes on with what it holds.
    """

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "FULL",
        accept_loss: bool = False,
        mark_interval: timedelta = timedelta(seconds=1),
    ) -> None:
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"synchronous must be FULL, NORMAL or EXTRA, not {synchronous!r}")
        self._path = path
        self._synchronous = synchronous.upper()
        self._writer: Writer | None = None
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shoal-store-reader")
        self._reader_conn: sqlite3.Connection | None = None
        self.state_path = state_path(path)
        self._lock = DirLock(path.with_suffix(".lock"))
        self._accept_loss = accept_loss
        self._mark_interval = mark_interval.total_seconds()
        self._marks = Marks()  # as last written to the state file (by the reader's thread)
        self._marker: asyncio.Task[None] | None = None

    def _connect(self, *, check_same_thread: bool = True) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._path, isolation_level=None, check_same_thread=check_same_thread
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    async def open(self) -> int:
        floor = await asyncio.to_thread(self._claim)
        try:
            await asyncio.to_thread(_private, self._path, before=True)
            try:
                conn = await asyncio.to_thread(self._connect, check_same_thread=False)
                await asyncio.to_thread(migrate, conn)
            except sqlite3.DatabaseError as err:
                raise FailedPrecondition(
                    f"cannot open the store {self._path} ({err}): restore the data dir from a"
                    " backup, or move the file aside to start an empty store"
                ) from None
            await asyncio.to_thread(_private, self._path, before=False)
            self._writer = Writer(conn, asyncio.get_running_loop())
            self._writer.start()
            epoch = int(await self._writer.submit(lambda c: _bump_epoch(c, floor)))
            # Recorded before the epoch is used: a store that loses it cannot hand it out again.
            try:
                await self._read(self._save_marks)
            except OSError as err:
                raise FailedPrecondition(
                    f"cannot record epoch {epoch} in {self.state_path}: {err.strerror}"
                ) from None
        except BaseException:
            await self.close()
            raise
        self._marker = asyncio.create_task(self._keep_marks(), name="shoal-store-marks")
        return epoch

    def _claim(self) -> int:
        """Lock the store and check it against its state file, writing nothing before both;
        returns the epoch it must go past."""
        self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock.acquire()
        try:
            return self._check()
        except BaseException:
            self._lock.release()
            raise

    def _check(self) -> int:
        report = check_store(self._path)
        if report.problems and not self._accept_loss:
            raise FailedPrecondition(_refusal(self._path, report.problems))
        if report.problems:
            _log.warning(
                "store %s: %s; going on with what it holds, as asked",
                self._path,
                "; ".join(report.problems),
            )
        # No state file: a new store, or one made before them (its marks are written next).
        return report.expected.epoch if report.expected is not None else 0

    def _save_marks(self, conn: sqlite3.Connection) -> None:
        """Record in the state file how far the store got, when that moved (in the reader's
        thread, which sees only committed data, and which runs one of these at a time)."""
        marks = found_marks(conn).at_least(self._marks)
        if marks != self._marks:
            write_marks(self.state_path, marks)
            self._marks = marks

    async def _keep_marks(self) -> None:
        while True:
            await asyncio.sleep(self._mark_interval)
            try:
                await self._read(self._save_marks)
            except (OSError, sqlite3.Error) as err:  # e.g. a full disk: the old marks hold
                _log.warning("cannot record the store's marks in %s: %s", self.state_path, err)

    async def close(self) -> None:
        marker, self._marker = self._marker, None
        if marker is not None:
            marker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await marker
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.stop()
            await asyncio.to_thread(writer.join)
        if marker is not None:  # every write is committed: the marks a restart must find
            try:
                await self._read(self._save_marks)
            except (OSError, sqlite3.Error) as err:
                _log.warning("cannot record the store's marks in %s: %s", self.state_path, err)
        if self._reader_conn is not None:
            await self._read(lambda conn: conn.close())
            self._reader_conn = None
        self._reader.shutdown(wait=True)
        self._lock.release()

    def _write(self, op: Op) -> asyncio.Future[Any]:
        if self._writer is None:
            raise Unavailable("the store is closed")
        return self._writer.submit(op)

    async def insert(
        self, rows: Sequence[TaskRow], request: Request | None = None
    ) -> tuple[list[str | None], list[list[str]]]:
        result: tuple[list[str | None], list[list[str]]] = await self._write(
            insert_op(rows, request)
        )
        return result

    async def finish(self, rows: Sequence[FinishedRow]) -> None:
        await self._write(finish_op(rows))

    async def _read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        def call() -> Any:
            if self._reader_conn is None:
                self._reader_conn = self._connect()
            return fn(self._reader_conn)

        return await asyncio.get_running_loop().run_in_executor(self._reader, call)

    async def unfinished(self) -> AsyncIterator[list[Unfinished]]:
        # The next page is read (in the reader's thread) while the caller takes in this one.
        cursor = await self._read(
            lambda c: c.execute(
                "SELECT seq, id, spec, created_at, submitted_by, NULLIF(depends_on, '[]'),"
                " placement, priority, tenant FROM tasks WHERE final_seq IS NULL ORDER BY seq"
            )
        )

        def page() -> list[Unfinished]:
            # Most tasks depend on nothing: their rows are used as SQLite returns them.
            return [
                r if r[5] is None else (*r[:5], json.loads(r[5]), *r[6:])
                for r in cursor.fetchmany(_UNFINISHED_PAGE)
            ]

        ahead = asyncio.ensure_future(self._read(lambda _: page()))
        try:
            while rows := await ahead:
                ahead = asyncio.ensure_future(self._read(lambda _: page()))
                yield rows
        finally:
            ahead.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ahead
            await self._read(lambda _: cursor.close())

    async def get(self, task_id: str) -> StoredTask | None:
        r = await self._read(
            lambda c: c.execute(f"SELECT {COLUMNS} FROM tasks WHERE id = ?", (task_id,)).fetchone()
        )
        return None if r is None else stored_task(r)

    async def list_tasks(
        self,
        *,
        before_seq: int | None,
        tenant: str | None,
        final_states: Sequence[int] | None,
        include_unfinished: bool,
        limit: int,
    ) -> list[StoredTask]:
        where: list[str] = []
        args: list[Any] = []
        if before_seq is not None:
            where.append("seq < ?")
            args.append(before_seq)
        if tenant:
            where.append("tenant = ?")
            args.append(tenant)
        if final_states is None:
            finals = "final_seq IS NOT NULL"
        else:
            finals = f"state IN ({','.join('?' * len(final_states))})" if final_states else "0"
            args += list(final_states)
        where.append(f"({finals} OR final_seq IS NULL)" if include_unfinished else finals)
        sql = f"SELECT {COLUMNS} FROM tasks WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?"
        args.append(limit)
        rows = await self._read(lambda c: c.execute(sql, args).fetchall())
        return [stored_task(r) for r in rows]

    async def events_between(
        self, after: int, before: int, limit: int
    ) -> list[tuple[int, StoredTask]]:
        def query(c: sqlite3.Connection) -> tuple[list[Any], list[Any]]:
            acc = c.execute(
                f"SELECT {COLUMNS} FROM tasks WHERE seq > ? AND seq < ? ORDER BY seq LIMIT ?",
                (after, before, limit),
            ).fetchall()
            fin = c.execute(
                f"SELECT {COLUMNS} FROM tasks WHERE final_seq > ? AND final_seq < ?"
                " ORDER BY final_seq LIMIT ?",
                (after, before, limit),
            ).fetchall()
            return acc, fin

        acc, fin = await self._read(query)
        # Either list may have been cut by the limit: keep only what both lists cover.
        bound = before
        if len(acc) == limit:
            bound = min(bound, acc[-1][0] + 1)
        if len(fin) == limit:
            bound = min(bound, fin[-1][8] + 1)
        items = [(r[0], stored_task(r)) for r in acc if r[0] < bound]
        items += [(r[8], stored_task(r)) for r in fin if r[8] < bound]
        items.sort(key=lambda item: item[0])
        return items

    async def tokens(self) -> list[TokenRow]:
        rows = await self._read(
            lambda c: c.execute(
                f"SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created_at"
            ).fetchall()
        )
        return [
            TokenRow(
                id=r[0],
                name=r[1],
                role=r[2],
                tenant=r[3],
                node_id=r[4],
                executors=json.loads(r[5]),
                labels=json.loads(r[6]),
                secret_hash=r[7],
                created_at=r[8],
                expires_at=r[9],
                revoked_at=r[10],
                created_by=r[11],
            )
            for r in rows
        ]

    async def put_token(self, row: TokenRow) -> None:
        values = (
            row.id,
            row.name,
            row.role,
            row.tenant,
            row.node_id,
            json.dumps(row.executors),
            json.dumps(row.labels),
            row.secret_hash,
            row.created_at,
            row.expires_at,
            row.revoked_at,
            row.created_by,
        )
        await self._write(
            lambda c: c.execute(
                f"INSERT INTO tokens ({TOKEN_COLUMNS}) VALUES ({','.join('?' * len(values))})",
                values,
            )
        )

    async def revoke_token(self, token_id: str, at: float) -> None:
        await self._write(
            lambda c: c.execute(
                "UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (at, token_id),
            )
        )

    async def schedules(self) -> list[bytes]:
        rows = await self._read(
            lambda c: c.execute("SELECT body FROM schedules ORDER BY name").fetchall()
        )
        return [r[0] for r in rows]

    async def put_schedule(self, name: str, body: bytes) -> None:
        await self._write(
            lambda c: c.execute(
                "INSERT INTO schedules (name, body) VALUES (?, ?)"
                " ON CONFLICT(name) DO UPDATE SET body = excluded.body",
                (name, body),
            )
        )

    async def delete_schedule(self, name: str) -> None:
        await self._write(lambda c: c.execute("DELETE FROM schedules WHERE name = ?", (name,)))

    async def members(self) -> list[str]:
        rows = await self._read(lambda c: c.execute("SELECT node_id FROM members").fetchall())
        return [r[0] for r in rows]

    async def set_member(self, node_id: str, member: bool) -> None:
        def op(c: sqlite3.Connection) -> None:
            if member:
                c.execute("INSERT OR IGNORE INTO members (node_id) VALUES (?)", (node_id,))
            else:
                c.execute("DELETE FROM members WHERE node_id = ?", (node_id,))
                c.execute("DELETE FROM node_attempts WHERE node_id = ?", (node_id,))
                c.execute("DELETE FROM dispatched WHERE node_id = ?", (node_id,))

        await self._write(op)

    async def node_attempts(self) -> dict[str, str]:
        def op(c: sqlite3.Connection) -> list[tuple[str, str]]:
            rows: list[tuple[str, str]] = c.execute(
                "SELECT node_id, attempts FROM node_attempts"
            ).fetchall()
            return (
                rows
                + c.execute("SELECT node_id, attempts FROM dispatched ORDER BY rowid").fetchall()
            )

        out: dict[str, str] = {}
        for node_id, text in await self._read(op):
            out[node_id] = f"{out[node_id]}\n{text}" if node_id in out else text
        return out

    async def put_node_attempts(self, attempts: Mapping[str, str]) -> None:
        def op(c: sqlite3.Connection) -> None:
            c.executemany(
                "INSERT INTO node_attempts (node_id, attempts) VALUES (?, ?)"
                " ON CONFLICT (node_id) DO UPDATE SET attempts = excluded.attempts",
                list(attempts.items()),
            )
            # The core built `attempts` after queueing every dispatch recorded so far (one
            # writer, in order), and every node dispatched to since its last record is in it.
            c.execute("DELETE FROM dispatched")

        await self._write(op)

    def add_dispatched(self, attempts: Mapping[str, str]) -> Awaitable[None]:
        return self._write(
            lambda c: c.executemany(
                "INSERT INTO dispatched (node_id, attempts) VALUES (?, ?)", list(attempts.items())
            )
        )

    async def quotas(self) -> list[bytes]:
        rows = await self._read(lambda c: c.execute("SELECT body FROM quotas").fetchall())
        return [r[0] for r in rows]

    async def put_quota(self, key: str, body: bytes) -> None:
        await self._write(
            lambda c: c.execute(
                "INSERT INTO quotas (key, body) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET body = excluded.body",
                (key, body),
            )
        )

    async def delete_quota(self, key: str) -> None:
        await self._write(lambda c: c.execute("DELETE FROM quotas WHERE key = ?", (key,)))

    async def usage(self) -> list[UsageRow]:
        rows = await self._read(
            lambda c: c.execute("SELECT key, period, requests, tokens, cost FROM usage").fetchall()
        )
        return [UsageRow(*r) for r in rows]

    async def add_usage(self, deltas: Sequence[UsageRow]) -> None:
        await self._write(
            lambda c: c.executemany(
                "INSERT INTO usage (key, period, requests, tokens, cost) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (key, period) DO UPDATE SET requests = requests + excluded.requests,"
                " tokens = tokens + excluded.tokens, cost = cost + excluded.cost",
                [(d.key, d.period, d.requests, d.tokens, d.cost) for d in deltas],
            )
        )

    async def leases(self) -> list[bytes]:
        rows = await self._read(lambda c: c.execute("SELECT body FROM leases").fetchall())
        return [r[0] for r in rows]

    async def lock_tokens(self) -> dict[str, int]:
        rows = await self._read(
            lambda c: c.execute("SELECT name, token FROM lock_tokens").fetchall()
        )
        return {name: token for name, token in rows}

    async def put_lease(self, name: str, token: int, body: bytes) -> None:
        def op(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO leases (name, token, body) VALUES (?, ?, ?)"
                " ON CONFLICT (name, token) DO UPDATE SET body = excluded.body",
                (name, token, body),
            )
            c.execute(
                "INSERT INTO lock_tokens (name, token) VALUES (?, ?) ON CONFLICT (name)"
                " DO UPDATE SET token = max(token, excluded.token)",
                (name, token),
            )

        await self._write(op)

    async def delete_lease(self, name: str, token: int) -> None:
        await self._write(
            lambda c: c.execute("DELETE FROM leases WHERE name = ? AND token = ?", (name, token))
        )
