"""Which coordinator leads on a shared PostgreSQL store: a lease row with a fencing epoch.

The lease runs on the database's clock (`now()`), so coordinators' clocks need not agree. A
standby takes the row once the lease ran out, bumping the epoch; every write of a leader is
fenced by its epoch (pgschema's shoal_fence), so a deposed leader commits nothing, and a
leader that cannot renew stops serving before its lease can run out on the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg

from shoal.coordinator.store.base import EPOCH_SHIFT
from shoal.coordinator.store.pgwriter import OPTIONS

__all__ = ["GIVE_UP", "Leader", "Leadership", "Member", "members"]

_log = logging.getLogger("shoal.coordinator")

GIVE_UP = 0.8
"""Part of the lease after its last renewal was sent by which a leader that could not renew
stops leading (the database's lease runs from a later moment: when the renewal arrived)."""

_TAKE = (
    "UPDATE leader SET expires_at = now() + %(ttl)s, holder = %(holder)s, address = %(address)s,"
    # Past every epoch the tasks' numbers carry (a store copied in from SQLite holds some).
    " epoch = greatest(epoch,"
    " (SELECT coalesce(max(seq), 0) >> %(shift)s FROM tasks),"
    " (SELECT coalesce(max(final_seq), 0) >> %(shift)s FROM tasks WHERE final_seq IS NOT NULL)"
    ") + 1 WHERE id = 1 AND expires_at < now() RETURNING epoch"
)


_SEEN = (
    "INSERT INTO coordinators (holder, address, seen_at) VALUES (%s, %s, now())"
    " ON CONFLICT (holder) DO UPDATE SET address = excluded.address, seen_at = now()"
)
_FORGET = "DELETE FROM coordinators WHERE seen_at < now() - interval '1 minute' OR holder = %s"


@dataclass(frozen=True, slots=True)
class Leader:
    """The coordinator that holds the lease, as the database says."""

    address: str
    epoch: int
    live: bool  # its lease has not run out


class Leadership:
    """The lease of one coordinator process: `acquire`, then `keep` until `release`."""

    def __init__(self, url: str, *, holder: str, address: str, ttl: timedelta) -> None:
        self._url = url
        self._holder = holder
        self.address = address
        self._ttl = ttl
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self.leader: Leader | None = None  # as last seen while standing by
        self.epoch = 0
        self._renewed = 0.0  # monotonic time the last successful renewal was sent
        self._abandoned: set[asyncio.Task[bool]] = set()  # renewals cancelled at the deadline

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(
                self._url,
                autocommit=True,
                **OPTIONS,
            )
        return self._conn

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def acquire(self, poll: timedelta) -> int:
        """Wait until this process leads; its epoch. Meanwhile `leader` names who does."""
        while True:
            sent = time.monotonic()
            try:
                conn = await self._connection()
                args = {
                    "ttl": self._ttl,
                    "holder": self._holder,
                    "address": self.address,
                    "shift": EPOCH_SHIFT,
                }
                await conn.execute(_SEEN, (self._holder, self.address))
                row = await (await conn.execute(_TAKE, args)).fetchone()
                if row is not None:
                    self.epoch = int(row[0])
                    self._renewed = sent
                    self.leader = Leader(self.address, self.epoch, True)
                    return self.epoch
                found = await (
                    await conn.execute(
                        "SELECT address, epoch, expires_at > now() FROM leader WHERE id = 1"
                    )
                ).fetchone()
                if found is not None:
                    self.leader = Leader(found[0], int(found[1]), bool(found[2]))
            except psycopg.Error as err:
                _log.warning("standing by: cannot reach the store's database: %s", err)
                await self._drop()
            await asyncio.sleep(poll.total_seconds())

    async def keep(self, on_lost: Callable[[str], None]) -> None:
        """Renew the lease until cancelled; `on_lost(reason)` once it is lost, then return.

        The lead is given up by a deadline (GIVE_UP of the lease after the last renewal was
        sent), before the database can see the lease run out; no renewal, reconnection or
        slow network can hold it past that deadline.
        """
        ttl = self._ttl.total_seconds()
        pause = ttl / 4
        while True:
            deadline = self._renewed + ttl * GIVE_UP
            await asyncio.sleep(max(0.0, min(pause, deadline - time.monotonic())))
            left = deadline - time.monotonic()
            if left <= 0:
                on_lost(f"could not renew the lead of epoch {self.epoch} in time")
                return
            sent = time.monotonic()
            # Not awaited past the deadline: a cancelled query may linger (psycopg then tries
            # to cancel it on the server), and the deadline does not wait for that.
            renewal = asyncio.create_task(self._renew(), name="shoal-lease-renewal")
            await asyncio.wait({renewal}, timeout=left)
            if not renewal.done():
                self._abandon(renewal)
                on_lost(f"could not renew the lead of epoch {self.epoch} in time")
                return
            try:
                renewed = renewal.result()
            except psycopg.Error as err:
                _log.warning("cannot renew the lead of epoch %s: %s", self.epoch, err)
                self._forget()
                pause = ttl / 20  # try again soon, until the deadline
                continue
            if not renewed:
                on_lost(f"another coordinator took over from epoch {self.epoch}")
                return
            self._renewed = sent
            pause = ttl / 4

    async def _renew(self) -> bool:
        """Extend this epoch's lease; False when another coordinator holds the lead."""
        conn = await self._connection()
        cur = await conn.execute(
            "UPDATE leader SET expires_at = now() + %s WHERE id = 1 AND epoch = %s",
            (self._ttl, self.epoch),
        )
        if cur.rowcount != 1:
            return False
        await conn.execute(_SEEN, (self._holder, self.address))
        return True

    def _abandon(self, renewal: asyncio.Task[bool]) -> None:
        """Cancel a renewal that outlived the deadline; its connection is closed once it ends."""
        renewal.cancel()
        conn, self._conn = self._conn, None
        self._abandoned.add(renewal)

        def ended(task: asyncio.Task[bool]) -> None:
            self._abandoned.discard(task)
            if not task.cancelled():
                task.exception()  # retrieved: it is of no interest any more
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.pgconn.finish()

        renewal.add_done_callback(ended)

    def _forget(self) -> None:
        """Drop the connection without waiting on it (its peer may be unreachable)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.pgconn.finish()  # closes the socket; sends nothing that could block

    async def release(self) -> None:
        """Give up the lead at once (a standby takes over without waiting out the lease)."""
        with contextlib.suppress(psycopg.Error, TimeoutError):
            conn = await self._connection()
            await asyncio.wait_for(conn.execute(_FORGET, (self._holder,)), self._ttl.seconds + 1)
            if self.epoch:
                await asyncio.wait_for(
                    conn.execute(
                        "UPDATE leader SET expires_at = '-infinity' WHERE id = 1 AND epoch = %s",
                        (self.epoch,),
                    ),
                    timeout=self._ttl.total_seconds(),
                )
        await self._drop()


@dataclass(frozen=True, slots=True)
class Member:
    """A coordinator on the store, as it last said it lives."""

    address: str
    seen_ago: float  # seconds
    leads: bool


def members(conn: psycopg.Connection[Any]) -> tuple[Leader | None, list[Member]]:
    """Who leads (None: nobody ever did) and every coordinator seen in the last minute."""
    row = conn.execute(
        "SELECT address, epoch, expires_at > now(), holder FROM leader WHERE id = 1 AND epoch > 0"
    ).fetchone()
    leader = Leader(row[0], int(row[1]), bool(row[2])) if row else None
    holder = row[3] if row and row[2] else None
    found = conn.execute(
        "SELECT holder, address, extract(epoch FROM now() - seen_at) FROM coordinators"
        " WHERE seen_at > now() - interval '1 minute' ORDER BY address"
    ).fetchall()
    return leader, [Member(r[1], float(r[2]), r[0] == holder) for r in found]
