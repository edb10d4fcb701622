"""The Store's methods as SQL that SQLite and PostgreSQL both speak.

A backend gives a reader (`_read`: run a function on a connection that sees committed data)
and a writer (`_write`: queue an operation for the next group commit); statements are
written with `?` placeholders, which the PostgreSQL connection turns into its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from abc import abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

from shoal.coordinator.store.base import Store
from shoal.coordinator.store.conn import Conn
from shoal.coordinator.store.rows import (
    ANY_TASK,
    FinishedRow,
    Request,
    StoredTask,
    TaskFilter,
    TaskRow,
    TokenRow,
    Unfinished,
    UsageRow,
)
from shoal.coordinator.store.schema import COLUMNS, TOKEN_COLUMNS, stored_task
from shoal.coordinator.store.task_writes import Op, finish_op, insert_op

__all__ = ["UNFINISHED_PAGE", "SqlStore"]

UNFINISHED_PAGE = 20_000
"""Rows read at a time on a restart."""

_T_COLUMNS = ", ".join(f"t.{c.strip()}" for c in COLUMNS.split(","))

_UNFINISHED = (
    "SELECT seq, id, spec, created_at, submitted_by, NULLIF(depends_on, '[]'), placement,"
    " priority, tenant FROM tasks WHERE final_seq IS NULL AND seq > ? ORDER BY seq LIMIT ?"
)


class SqlStore(Store):
    """Every Store method but opening and closing, over `_read` and `_write`."""

    _DISPATCHED_ORDER = "rowid"  # the column that keeps the dispatched lines in arrival order

    @abstractmethod
    def _write(self, op: Op, *, ride_along: bool = False) -> asyncio.Future[Any]:
        """Queue `op` for the next group commit; the future has its result once committed.
        With `ride_along` (nobody waits for it) it starts no commit of its own (see Writer)."""

    @abstractmethod
    async def _read(self, fn: Callable[[Any], Any]) -> Any:
        """Run `fn` on the reader's connection (in its thread): one that is a `Conn`."""

    async def insert(
        self, rows: Sequence[TaskRow], request: Request | None = None
    ) -> tuple[list[str | None], list[list[str]]]:
        result: tuple[list[str | None], list[list[str]]] = await self._write(
            insert_op(rows, request)
        )
        return result

    async def finish(self, rows: Sequence[FinishedRow]) -> None:
        await self._write(finish_op(rows))

    async def unfinished(self) -> AsyncIterator[list[Unfinished]]:
        # Page by page from the last seq read (an index range each); the next page is read
        # while the caller takes in this one.
        def page(c: Conn, after: int) -> list[Unfinished]:
            rows: list[Any] = c.execute(_UNFINISHED, (after, UNFINISHED_PAGE)).fetchall()
            # Most tasks depend on nothing: their rows are used as the driver returns them.
            return [r if r[5] is None else (*r[:5], json.loads(r[5]), *r[6:]) for r in rows]

        ahead = asyncio.ensure_future(self._read(functools.partial(page, after=0)))
        try:
            while rows := await ahead:
                last = rows[-1][0]
                ahead = asyncio.ensure_future(self._read(functools.partial(page, after=last)))
                yield rows
        finally:
            ahead.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ahead

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
        only: TaskFilter = ANY_TASK,
    ) -> list[StoredTask]:
        # With labels, the first one's index drives (newest first, from the cursor on) and
        # the tasks are joined to it; else the executor's index, or the tasks' own order.
        order = "t.seq"
        joins: list[str] = []
        where: list[str] = []
        args: list[Any] = []
        for i, (key, value) in enumerate(only.labels):
            joins.append(f" JOIN task_labels l{i} ON l{i}.seq = t.seq")
            where.append(f"l{i}.key = ? AND l{i}.value = ?")
            args += [key, value]
        if only.labels:
            order = "l0.seq"
        if before_seq is not None:
            where.append(f"{order} < ?")
            args.append(before_seq)
        if only.executor:
            where.append("t.executor = ?")
            args.append(only.executor)
        if only.created_after is not None:
            where.append("t.created_at >= ?")
            args.append(only.created_after)
        if only.created_before is not None:
            where.append("t.created_at < ?")
            args.append(only.created_before)
        if tenant:
            where.append("t.tenant = ?")
            args.append(tenant)
        if final_states is None:
            finals = "t.final_seq IS NOT NULL"
        else:
            marks = ",".join("?" * len(final_states))
            finals = f"t.state IN ({marks})" if final_states else "FALSE"
            args += list(final_states)
        where.append(f"({finals} OR t.final_seq IS NULL)" if include_unfinished else finals)
        sql = (
            f"SELECT {_T_COLUMNS} FROM tasks t{''.join(joins)} WHERE {' AND '.join(where)}"
            f" ORDER BY {order} DESC LIMIT ?"
        )
        args.append(limit)
        rows = await self._read(lambda c: c.execute(sql, args).fetchall())
        return [stored_task(r) for r in rows]

    async def dependents(self, task_id: str, limit: int) -> list[tuple[str, str]]:
        rows = await self._read(
            lambda c: c.execute(
                "SELECT t.id, t.tenant FROM task_edges e JOIN tasks t ON t.seq = e.seq"
                " WHERE e.upstream = ? ORDER BY e.seq LIMIT ?",
                (task_id, limit),
            ).fetchall()
        )
        return [(r[0], r[1]) for r in rows]

    async def events_between(
        self, after: int, before: int, limit: int
    ) -> list[tuple[int, StoredTask]]:
        def query(c: Conn) -> tuple[list[Any], list[Any]]:
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
                secret_hash=bytes(r[7]),
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
        return [bytes(r[0]) for r in rows]

    async def put_schedule(self, name: str, body: bytes) -> None:
        await self._write(
            lambda c: c.execute(
                "INSERT INTO schedules (name, body) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET body = excluded.body",
                (name, body),
            )
        )

    async def delete_schedule(self, name: str) -> None:
        await self._write(lambda c: c.execute("DELETE FROM schedules WHERE name = ?", (name,)))

    async def members(self) -> list[str]:
        rows = await self._read(lambda c: c.execute("SELECT node_id FROM members").fetchall())
        return [r[0] for r in rows]

    async def set_member(self, node_id: str, member: bool) -> None:
        def op(c: Conn) -> None:
            if member:
                c.execute(
                    "INSERT INTO members (node_id) VALUES (?) ON CONFLICT DO NOTHING", (node_id,)
                )
            else:
                c.execute("DELETE FROM members WHERE node_id = ?", (node_id,))
                c.execute("DELETE FROM node_attempts WHERE node_id = ?", (node_id,))
                c.execute("DELETE FROM dispatched WHERE node_id = ?", (node_id,))

        await self._write(op)

    async def node_attempts(self) -> dict[str, str]:
        order = self._DISPATCHED_ORDER

        def op(c: Conn) -> list[tuple[str, str]]:
            rows = list(c.execute("SELECT node_id, attempts FROM node_attempts").fetchall())
            return rows + list(
                c.execute(f"SELECT node_id, attempts FROM dispatched ORDER BY {order}").fetchall()
            )

        out: dict[str, str] = {}
        for node_id, text in await self._read(op):
            out[node_id] = f"{out[node_id]}\n{text}" if node_id in out else text
        return out

    async def put_node_attempts(self, attempts: Mapping[str, str]) -> None:
        def op(c: Conn) -> None:
            c.executemany(
                "INSERT INTO node_attempts (node_id, attempts) VALUES (?, ?)"
                " ON CONFLICT (node_id) DO UPDATE SET attempts = excluded.attempts",
                list(attempts.items()),
            )
            # The core built `attempts` after queueing every dispatch recorded so far (one
            # writer, in order), and every node dispatched to since its last record is in it.
            c.execute("DELETE FROM dispatched")

        await self._write(op, ride_along=True)

    def add_dispatched(self, attempts: Mapping[str, str]) -> Awaitable[None]:
        return self._write(
            lambda c: c.executemany(
                "INSERT INTO dispatched (node_id, attempts) VALUES (?, ?)", list(attempts.items())
            )
        )

    async def quotas(self) -> list[bytes]:
        rows = await self._read(lambda c: c.execute("SELECT body FROM quotas").fetchall())
        return [bytes(r[0]) for r in rows]

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
                "INSERT INTO usage AS u (key, period, requests, tokens, cost)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (key, period) DO UPDATE SET"
                " requests = u.requests + excluded.requests, tokens = u.tokens + excluded.tokens,"
                " cost = u.cost + excluded.cost",
                [(d.key, d.period, d.requests, d.tokens, d.cost) for d in deltas],
            )
        )

    async def leases(self) -> list[bytes]:
        rows = await self._read(lambda c: c.execute("SELECT body FROM leases").fetchall())
        return [bytes(r[0]) for r in rows]

    async def lock_tokens(self) -> dict[str, int]:
        rows = await self._read(
            lambda c: c.execute("SELECT name, token FROM lock_tokens").fetchall()
        )
        return {name: token for name, token in rows}

    async def put_lease(self, name: str, token: int, body: bytes) -> None:
        def op(c: Conn) -> None:
            c.execute(
                "INSERT INTO leases (name, token, body) VALUES (?, ?, ?)"
                " ON CONFLICT (name, token) DO UPDATE SET body = excluded.body",
                (name, token, body),
            )
            c.execute(
                "INSERT INTO lock_tokens (name, token) VALUES (?, ?) ON CONFLICT (name)"
                " DO UPDATE SET token = excluded.token WHERE lock_tokens.token < excluded.token",
                (name, token),
            )

        await self._write(op)

    async def delete_lease(self, name: str, token: int) -> None:
        await self._write(
            lambda c: c.execute("DELETE FROM leases WHERE name = ? AND token = ?", (name, token))
        )
