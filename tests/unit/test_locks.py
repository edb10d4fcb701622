"""Locks through the core: all or nothing, shared and exclusive, leases that expire and fence."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from shoal import shell
from shoal.coordinator.core import Coordinator
from shoal.coordinator.locks import parse_locks
from shoal.coordinator.store import SqliteStore
from shoal.errors import InvalidArgument

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
    c = Coordinator(SqliteStore(tmp_path / "s.db"), wall=wall)
    await c.start()
    readers = [
        await c.acquire_lock("x", 10 * SECOND, timedelta(0), shared=True, by=ALICE)
        for _ in range(2)
    ]
    assert [r.token for r in readers] == [1, 2]
    (task,) = await c.submit([shell("write", locks=["x"])], by=ALICE)
    await c.stop()

    c = Coordinator(SqliteStore(tmp_path / "s.db"), wall=wall)
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
