"""The embedded SQLite backend of the Store: WAL, one writer thread, group commit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import sqlite3
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

from shoal.coordinator.store.base import EPOCH_SHIFT
from shoal.coordinator.store.conn import Conn, Op
from shoal.coordinator.store.dirlock import DirLock
from shoal.coordinator.store.marks import Marks, found_marks, write_marks
from shoal.coordinator.store.schema import migrate
from shoal.coordinator.store.sqlstore import SqlStore
from shoal.coordinator.store.storecheck import check_store, state_path
from shoal.coordinator.store.writer import SqliteWriter
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


def _bump_epoch(conn: Conn, floor: int) -> int:
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


class SqliteStore(SqlStore):
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
        self._writer: SqliteWriter | None = None
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
            self._writer = SqliteWriter(conn, asyncio.get_running_loop())
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

    def _write(self, op: Op, *, ride_along: bool = False) -> asyncio.Future[Any]:
        if self._writer is None:
            raise Unavailable("the store is closed")
        return self._writer.submit(op, ride_along=ride_along)

    async def _read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        def call() -> Any:
            if self._reader_conn is None:
                self._reader_conn = self._connect()
            return fn(self._reader_conn)

        return await asyncio.get_running_loop().run_in_executor(self._reader, call)
