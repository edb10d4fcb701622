"""The two durable writes of a task: its acceptance (with its request id) and its outcome."""

from __future__ import annotations

import json
from collections.abc import Sequence

from shoal.coordinator.store.base import REQUEST_RETENTION
from shoal.coordinator.store.conn import Conn, Op
from shoal.coordinator.store.rows import FinishedRow, Request, TaskRow
from shoal.errors import FailedPrecondition

__all__ = ["Op", "finish_op", "insert_op"]


_INSERTED = (
    "seq, id, idempotency_key, tenant, priority, spec, created_at, submitted_by, depends_on,"
    " placement, executor"
)


def _by_key(conn: Conn, key: str) -> str | None:
    found = conn.execute("SELECT id FROM tasks WHERE idempotency_key = ?", (key,)).fetchone()
    return found[0] if found else None


_KEYS_AT_ONCE = 500  # keys looked up per statement (SQLite takes at most 32766 parameters)


def _by_keys(conn: Conn, keys: list[str]) -> dict[str, str]:
    """The tasks already holding some of `keys`: one statement per 500 keys, not per key."""
    found: dict[str, str] = {}
    for i in range(0, len(keys), _KEYS_AT_ONCE):
        chunk = keys[i : i + _KEYS_AT_ONCE]
        found.update(
            conn.execute(
                "SELECT idempotency_key, id FROM tasks WHERE idempotency_key IN"
                f" ({','.join('?' * len(chunk))})",
                chunk,
            ).fetchall()
        )
    return found


def _earlier_request(
    conn: Conn, rows: Sequence[TaskRow], request: Request
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
    def op(conn: Conn) -> tuple[list[str | None], list[list[str]]]:
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
        keys = [r.idempotency_key for r in rows if r.idempotency_key is not None]
        held = _by_keys(conn, keys) if keys else {}
        existing = [
            None if r.idempotency_key is None else held.get(r.idempotency_key) for r in rows
        ]
        final = [old or r.id for old, r in zip(existing, rows, strict=True)]
        resolved = [[final[d] if isinstance(d, int) else d for d in r.depends_on] for r in rows]
        conn.executemany(
            f"INSERT INTO tasks ({_INSERTED}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                    r.executor or None,
                )
                for r, old, ups in zip(rows, existing, resolved, strict=True)
                if old is None
            ],
        )
        # Most tasks have neither upstream nor labels: nothing more is written for them.
        edges = [
            (up, r.seq)
            for r, old, ups in zip(rows, existing, resolved, strict=True)
            if ups and old is None
            for up in dict.fromkeys(ups)
        ]
        if edges:
            conn.executemany("INSERT INTO task_edges (upstream, seq) VALUES (?, ?)", edges)
        labels = [
            (key, value, r.seq)
            for r, old in zip(rows, existing, strict=True)
            if r.labels and old is None
            for key, value in dict.fromkeys(r.labels)
        ]
        if labels:
            conn.executemany("INSERT INTO task_labels (key, value, seq) VALUES (?, ?, ?)", labels)
        return existing, resolved

    return op


def finish_op(rows: Sequence[FinishedRow]) -> Op:
    def op(conn: Conn) -> None:
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
