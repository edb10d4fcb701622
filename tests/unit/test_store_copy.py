"""Moving an SQLite store into PostgreSQL: everything arrives, epochs go on past the SQLite
store's, and a target that holds tasks is refused with nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.coordinator.store import SqliteStore, UsageRow
from shoal.coordinator.store.copy import copy_store
from shoal.coordinator.store.postgres import PostgresStore
from shoal.coordinator.store.rows import Request
from shoal.errors import FailedPrecondition

from .test_store_contract import done, row, unfinished


async def test_a_copied_store_holds_all_and_goes_on_in_a_later_epoch(
    tmp_path: Path, postgres_url: str
) -> None:
    for _ in range(3):  # epochs 1 to 3
        earlier = SqliteStore(tmp_path / "s.db")
        await earlier.open()
        await earlier.close()
    sqlite = SqliteStore(tmp_path / "s.db")
    await sqlite.open()
    await sqlite.insert([row(1, key="k"), row(2)], Request("caller\0r1", 5.0))
    await sqlite.finish([done(1, 7)])
    await sqlite.put_schedule("nightly", b"\x01")
    await sqlite.add_usage([UsageRow("q", "2026-12", 1, 2, 0.5)])
    await sqlite.add_dispatched({"n1": "t2 4 1"})
    await sqlite.close()

    counts = copy_store(tmp_path / "s.db", postgres_url)
    assert counts["tasks"] == 2 and counts["requests"] == 1 and counts["schedules"] == 1

    pg = PostgresStore(postgres_url)
    assert await pg.open() == 5  # past the SQLite store's 4
    try:
        assert [r[1] for r in await unfinished(pg)] == ["t2"]
        got = await pg.get("t1")
        assert got is not None and got.outcome is not None and got.outcome.final_seq == 7
        assert await pg.schedules() == [b"\x01"]
        assert await pg.usage() == [UsageRow("q", "2026-12", 1, 2, 0.5)]
        assert await pg.node_attempts() == {"n1": "t2 4 1"}
        # The copied request id still answers a resend with the first ids.
        assert (await pg.insert([row(8), row(9)], Request("caller\0r1", 6.0)))[0] == ["t1", "t2"]
    finally:
        await pg.close()

    with pytest.raises(FailedPrecondition, match="already holds tasks"):
        copy_store(tmp_path / "s.db", postgres_url)


def test_a_missing_store_is_refused(tmp_path: Path, postgres_url: str) -> None:
    with pytest.raises(FailedPrecondition, match="no store at"):
        copy_store(tmp_path / "none.db", postgres_url)
