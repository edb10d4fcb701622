"""The two durable writes of a task: its acceptance (with its request id) and its outcome."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence

from shoal.coordinator.store.base import REQUEST_RETENTION
from shoal.coordinator.store.rows import FinishedRow, Request, TaskRow
from shoal.coordinator.store.writer import Op
from shoal.errors import FailedPrecondition

__all__ = ["finish_op", "insert_op"]


_INSERTED = (
    "seq, id, idempotency_key, tenant, priority, spec, created_at, submitted_by, depends_on,"
    " placement"
)


def _by_key(conn: sqlite3.Connection, key: str) -> str | None:
    found = conn.execute("SELECT id FROM tasks WHERE idempotency_key = ?", (key,)).fetchone()
    return found[0] if found else None


def _earlier_request(
    conn: sqlite3.Connection, rows: Sequence[TaskRow], request: Request
) -> list[str | None] | None:
    """The task ids of a request stored before under the same key, in its order, or None."""
    found = conn.execute(
        "SELECT first_seq, count FROM requests WHERE key = ?", (request.key,)
    ).fetchone()
    if found is None:
        return None
    first, count = found
    if count != len(rows):
        raise FailedPrecondition(
            f"this request id was used before for {count} task(s), not {len(rows)}"
        )
    ids = dict(
        conn.execute(
            "SELECT seq, id FROM tasks WHERE seq BETWEEN ? AND ?", (first, first + count - 1)
        ).fetchall()
    )
    # A row the first request did not insert had matched another task's idempotency key.
    return [
        ids.get(first + i) or (r.idempotency_key and _by_key(conn, r.idempotency_key))
        for i, r in enumerate(rows)
    ]


def insert_op(rows: Sequence[TaskRow], request: Request | None) -> Op:
    def op(conn: sqlite3.Connection) -> tuple[list[str | None], list[list[str]]]:
        # The one writer runs this: nothing can insert a key between the lookup and the insert.
        if request is not None:
            earlier = _earlier_request(conn, rows, request)
            if earlier is not None:
                return earlier, [[] for _ in rows]
            conn.execute(
                "INSERT INTO requests (key, first_seq, count, created_at) VALUES (?, ?, ?, ?)",
                (request.key, rows[0].seq, len(rows), request.created_at),
            )
            conn.execute(
                "DELETE FROM requests WHERE created_at < ?",
                (request.created_at - REQUEST_RETENTION,),
            )
        existing: list[str | None] = [None] * len(rows)
        for i, r in enumerate(rows):
            if r.idempotency_key is not None:
                existing[i] = _by_key(conn, r.idempotency_key)
        final = [old or r.id for old, r in zip(existing, rows, strict=True)]
        resolved = [[final[d] if isinstance(d, int) else d for d in r.depends_on] for r in rows]
        conn.executemany(
            f"INSERT INTO tasks ({_INSERTED}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    r.seq,
                    r.id,
                    r.idempotency_key,
                    r.tenant,
                    r.priority,
                    r.spec,
                    r.created_at,
                    r.submitted_by,
                    json.dumps(ups) if ups else "[]",
                    r.placement,
                )
                for r, old, ups in zip(rows, existing, resolved, strict=True)
                if old is None
            ],
        )
        return existing, resolved

    return op


def finish_op(rows: Sequence[FinishedRow]) -> Op:
    def op(conn: sqlite3.Connection) -> None:
        conn.executemany(
            "UPDATE tasks SET state = ?, final_seq = ?, finished_at = ?, started_at = ?,"
            " node_id = ?, attempt_epoch = ?, attempt_number = ?, result = ?, finished_by = ?,"
            " attempts = ? WHERE seq = ? AND final_seq IS NULL",
            [
                (
                    r.state,
                    r.final_seq,
                    r.finished_at,
                    r.started_at,
                    r.node_id,
                    r.attempt_epoch,
                    r.attempt_number,
                    r.result,
                    r.finished_by,
                    r.attempts or None,
                    r.seq,
                )
                for r in rows
            ],
        )

    return op
