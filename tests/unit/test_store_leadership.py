"""Several coordinators on one PostgreSQL store: one leads, a standby takes over once the
lease runs out or is released, and a deposed leader commits nothing."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import psycopg
import pytest

from shoal.coordinator.store.postgres import PostgresStore
from shoal.errors import Unavailable
from tests.integration.harness import eventually

from .test_store_contract import done, row, unfinished

LEASE = timedelta(seconds=1)
POLL = timedelta(milliseconds=50)


def store(url: str, address: str) -> PostgresStore:
    return PostgresStore(url, address=address, lease=LEASE, poll=POLL)


async def test_a_standby_waits_and_names_the_leader_then_leads_when_it_lets_go(
    postgres_url: str,
) -> None:
    first, second = store(postgres_url, "a:1"), store(postgres_url, "b:2")
    assert await first.open() == 1
    await first.insert([row(1), row(2)])
    waiting = asyncio.create_task(second.open())

    def names_the_leader() -> None:
        assert second.leader is not None and second.leader.address == "a:1"
        assert second.leader.live

    await eventually(names_the_leader)
    assert not waiting.done()
    await first.close()  # lets go of the lease at once
    assert await asyncio.wait_for(waiting, 10) == 2
    assert [r[1] for r in await unfinished(second)] == ["t1", "t2"]
    await second.close()


async def test_a_deposed_leader_commits_nothing_and_hears_it(postgres_url: str) -> None:
    first = store(postgres_url, "a:1")
    await first.open()
    lost: list[str] = []
    first.on_lost = lost.append
    await first.insert([row(1)])
    # Another coordinator takes the lead while this one still thinks it leads (its lease
    # keeper is stopped, as if this process were frozen).
    assert first._keeper is not None
    first._keeper.cancel()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("UPDATE leader SET expires_at = '-infinity'")
    second = store(postgres_url, "b:2")
    assert await second.open() == 2

    with pytest.raises(Unavailable, match="no longer leads"):
        await first.finish([done(1, 5)])
    with pytest.raises(Unavailable, match="no longer leads"):
        await first.insert([row(2)])
    await eventually(lambda: lost == ["another coordinator took over"])
    got = await second.get("t1")
    assert got is not None and got.outcome is None
    assert await second.get("t2") is None
    await first.close()
    await second.close()


async def test_a_leader_that_cannot_renew_gives_up_and_a_standby_takes_over(
    postgres_url: str,
) -> None:
    first = store(postgres_url, "a:1")
    await first.open()
    lost: list[str] = []
    first.on_lost = lost.append
    standby = store(postgres_url, "b:2")
    waiting = asyncio.create_task(standby.open())
    # The leader's renewals stop reaching the database: it holds the lead no more.
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND application_name = ''"
        )
    first.leadership._url = "postgresql://shoal@127.0.0.1:1/nowhere"  # partitioned
    await eventually(lambda: lost != [], timeout=10)
    assert await asyncio.wait_for(waiting, 10) == 2
    await first.close()
    await standby.close()
