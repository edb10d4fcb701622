"""Locks through the core: all or nothing, shared and exclusive, leases that expire and fence."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from shoal import shell
from shoal.auth import Principal, Role
from shoal.config import CoreOptions
from shoal.coordinator.engine import Coordinator
from shoal.coordinator.gates.locks import parse_locks
from shoal.coordinator.store import SqliteStore
from shoal.errors import FailedPrecondition, InvalidArgument

from .test_core import ADMIN, ALICE, NODE, Wall, finished, hello
from .test_quotas import dispatched

SECOND = timedelta(seconds=1)


def test_declared_locks_parse_once_each_exclusive_winning() -> None:
    assert parse_locks(["read:a", "b", "a", "read:c"]) == (("a", False), ("b", False), ("c", True))
    with pytest.raises(InvalidArgument):
        parse_locks(["read:"])


async def test_a_task_takes_all_its_locks_or_none(tmp_path: Path) -> None:
    c = Coordinator(SqliteStore(tmp_path / "s.db"))
    await c.start()
    try:
        holder, both, other_a = await c.submit(
            [shell("b", locks=["b"]), shell("ab", locks=["a", "b"]), shell("a", locks=["a"])],
            by=ALICE,
        )
        node = c.attach(hello("n1", slots=5), "peer", by=NODE)
        got = {a.task_id: a for a in await dispatched(node)}
        # `both` waits for b without holding a: the task that needs only a runs.
        assert set(got) == {holder.task_id, other_a.task_id}
        assert (await c.get(both.task_id, by=ALICE)).pending_reason == (
            f"lock b is held by task {holder.task_id} (exclusive)"
        )
        c.on_message(node, finished(got[holder.task_id]))
        assert await dispatched(node) == []  # a is still held
        c.on_message(node, finished(got[other_a.task_id]))
        (last,) = await dispatched(node)
        assert last.task_id == both.task_id
    finally:
        await c.stop()


async def test_leases_expire_and_their_tokens_keep_growing_across_restarts(
    tmp_path: Path,
) -> None:
    wall = Wall()
    c = Coordinator(SqliteStore(tmp_path / "s.db"), clock=wall, wall=wall)
    await c.start()
    readers = [
        await c.acquire_lock("x", 10 * SECOND, timedelta(0), shared=True, by=ALICE)
        for _ in range(2)
    ]
    assert [r.token for r in readers] == [1, 2]
    (task,) = await c.submit([shell("write", locks=["x"])], by=ALICE)
    await c.stop()

    c = Coordinator(SqliteStore(tmp_path / "s.db"), clock=wall, wall=wall)
    await c.start()  # the leases are still held after a restart
    try:
        node = c.attach(hello("n1"), "peer", by=NODE)
        assert await dispatched(node) == []
        wall.now += 11  # both leases run out
        c.tick()
        (a,) = await dispatched(node)
        assert a.task_id == task.task_id
        c.on_message(node, finished(a))
        nxt = await c.acquire_lock("y", SECOND, timedelta(0), shared=False, by=ADMIN)
        again = await c.acquire_lock("x", SECOND, SECOND, shared=True, by=ALICE)
        assert (nxt.token, again.token) == (1, 3)  # per name, never reused
    finally:
        await c.stop()


async def test_a_lease_takes_at_most_max_lock_ttl_at_once(tmp_path: Path) -> None:
    c = Coordinator(SqliteStore(tmp_path / "s.db"), CoreOptions(max_lock_ttl=timedelta(hours=1)))
    await c.start()
    try:
        with pytest.raises(InvalidArgument, match="max_lock_ttl"):
            await c.acquire_lock("x", timedelta(hours=2), timedelta(0), shared=False, by=ALICE)
        lease = await c.acquire_lock("x", timedelta(hours=1), timedelta(0), shared=False, by=ALICE)
        with pytest.raises(InvalidArgument, match="max_lock_ttl"):
            await c.renew_lock("x", lease.token, timedelta(days=365), by=ALICE)
    finally:
        await c.stop()


async def test_a_tenant_neither_holds_nor_blocks_another_tenants_locks(tmp_path: Path) -> None:
    acme = Principal("acme-app", Role.SUBMITTER, tenant="acme")
    globex = Principal("globex-app", Role.SUBMITTER, tenant="globex")
    c = Coordinator(SqliteStore(tmp_path / "s.db"))
    await c.start()
    try:
        mine = await c.acquire_lock("db", 10 * SECOND, timedelta(0), shared=False, by=acme)
        theirs = await c.acquire_lock("db", 10 * SECOND, timedelta(0), shared=False, by=globex)
        assert (mine.name, theirs.name) == ("tenant/acme/db", "tenant/globex/db")
        await c.release_lock("db", theirs.token, by=globex)  # its own: acme's stays held
        with pytest.raises(FailedPrecondition):  # and globex's "db" is gone
            await c.renew_lock("db", theirs.token, SECOND, by=globex)
        with pytest.raises(FailedPrecondition):  # an admin names a tenant's lock in full
            await c.acquire_lock("tenant/acme/db", SECOND, timedelta(0), shared=False, by=ADMIN)
        # Task locks too: acme's task waits for acme's lease, globex's runs.
        waits, runs = await c.submit([shell("a", locks=["db"])], by=acme) + await c.submit(
            [shell("g", locks=["read:other", "tenant/acme/db"])], by=globex
        )
        node = c.attach(hello("n1", slots=2), "peer", by=NODE)
        assert [a.task_id for a in await dispatched(node)] == [runs.task_id]
        assert "lock tenant/acme/db is held" in (await c.get(waits.task_id, by=acme)).pending_reason
        await c.release_lock(mine.name, mine.token, by=acme)  # in full or not: the same
        assert [a.task_id for a in await dispatched(node)] == [waits.task_id]
    finally:
        await c.stop()
