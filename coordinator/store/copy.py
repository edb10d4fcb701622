"""Moving an SQLite store into an empty PostgreSQL one: every table, in one transaction."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import psycopg

from shoal.coordinator.store.marks import found_marks, open_read_only
from shoal.coordinator.store.pgschema import migrate
from shoal.coordinator.store.pgwriter import connect
from shoal.coordinator.store.postgres import redacted, request_key
from shoal.coordinator.store.schema import TOKEN_COLUMNS
from shoal.coordinator.store.storecheck import check_store
from shoal.errors import FailedPrecondition

__all__ = ["copy_store"]

_TABLES = (
    (
        "tasks",
        "seq, id, idempotency_key, tenant, priority, spec, created_at, state, final_seq,"
        " finished_at, started_at, node_id, attempt_epoch, attempt_number, result,"
        " submitted_by, finished_by, depends_on, attempts, placement, executor",
        "seq",
    ),
    ("task_labels", "key, value, seq", "key, value, seq"),
    ("task_edges", "upstream, seq", "upstream, seq"),
    ("tokens", TOKEN_COLUMNS, "created_at"),
    ("schedules", "name, body", "name"),
    ("members", "node_id", "node_id"),
    ("node_attempts", "node_id, attempts", "node_id"),
    ("dispatched", "node_id, attempts", "rowid"),
    ("requests", "key, first_seq, count, created_at", "key"),
    ("quotas", "key, body", "key"),
    ("lock_tokens", "name, token", "name"),
    ("leases", "name, token, body", "name, token"),
    ("usage", "key, period, requests, tokens, cost", "key, period"),
)
_PAGE = 10_000


def copy_store(source: Path, url: str) -> dict[str, int]:
    """Copy the SQLite store at `source` (no coordinator may run on it) into the empty
    database at `url`; rows copied per table. FailedPrecondition, with nothing written, when
    the source lost data or the target holds tasks or is led by a coordinator."""
    report = check_store(source)
    if not source.exists():
        raise FailedPrecondition(f"there is no store at {source}")
    if report.problems:
        raise FailedPrecondition(f"the store {source}: {'; '.join(report.problems)}")
    counts: dict[str, int] = {}
    with contextlib.closing(open_read_only(source)) as src:
        epoch = found_marks(src).at_least(report.expected or report.found).epoch
        try:
            with connect(url) as dst:
                migrate(dst)
                with dst.transaction():
                    _check_target(dst, url)
                    for table, columns, order in _TABLES:
                        counts[table] = _copy_table(src, dst, table, columns, order)
                    # Epochs go on past every one the SQLite store used.
                    dst.execute("UPDATE leader SET epoch = greatest(epoch, %s)", (epoch,))
        except psycopg.Error as err:
            raise FailedPrecondition(f"cannot copy into {redacted(url)}: {err}") from None
    return counts


def _check_target(dst: psycopg.Connection[Any], url: str) -> None:
    live = dst.execute("SELECT expires_at > now() FROM leader WHERE id = 1 FOR UPDATE").fetchone()
    if live and live[0]:
        raise FailedPrecondition(f"a coordinator runs on {redacted(url)}: stop it first")
    if dst.execute("SELECT 1 FROM tasks LIMIT 1").fetchone():
        raise FailedPrecondition(f"{redacted(url)} already holds tasks: copy into an empty one")


def _copy_table(
    src: sqlite3.Connection, dst: psycopg.Connection[Any], table: str, columns: str, order: str
) -> int:
    cursor = src.execute(f"SELECT {columns} FROM {table} ORDER BY {order}")
    n = 0
    with dst.cursor().copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
        while rows := cursor.fetchmany(_PAGE):
            for row in rows:
                if table == "requests":
                    row = (request_key(row[0]), *row[1:])
                copy.write_row(row)
            n += len(rows)
    return n
