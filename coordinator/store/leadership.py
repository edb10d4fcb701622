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

__all__ = ["Leader", "Leadership", "Member", "members"]

_log = logging.getLogger("shoal.coordinator")

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
        """Renew the lease until cancelled; `on_lost(reason)` once it is lost, then return."""
        ttl = self._ttl.total_seconds()
        while True:
            await asyncio.sleep(ttl / 4)
            sent = time.monotonic()
            try:
                conn = await self._connection()
                cur = await asyncio.wait_for(
                    conn.execute(
                        "UPDATE leader SET expires_at = now() + %s WHERE id = 1 AND epoch = %s",
                        (self._ttl, self.epoch),
                    ),
                    timeout=ttl / 2,
                )
                if cur.rowcount == 1:
                    self._renewed = sent
                    await conn.execute(_SEEN, (self._holder, self.address))
                    continue
                on_lost(f"another coordinator took over from epoch {self.epoch}")
                return
            except (psycopg.Error, TimeoutError) as err:
                _log.warning("cannot renew the lead of epoch %s: %s", self.epoch, err)
                await self._drop()
            # Before the database can see the lease run out (its clock started later).
            if time.monotonic() - self._renewed >= ttl * 0.8:
                on_lost(f"could not renew the lead of epoch {self.epoch} in time")
                return

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
