"""What only the SQLite store does: private files, a full disk, one opener, the state file
(the contract every backend keeps is in test_store_contract.py)."""

from __future__ import annotations

import os
import sqlite3
import stat
from datetime import timedelta
from pathlib import Path

import pytest

from shoal.coordinator.events import EPOCH_SHIFT
from shoal.coordinator.store import STORE_FULL, FinishedRow, SqliteStore, TaskRow, Unfinished
from shoal.coordinator.store.marks import Marks, read_marks
from shoal.errors import FailedPrecondition, ResourceExhausted
from shoal.v1 import task_pb2
from tests.integration.harness import eventually


async def unfinished(store: SqliteStore) -> list[Unfinished]:
    return [row for page in [p async for p in store.unfinished()] for row in page]


def row(seq: int, key: str | None = None, tenant: str = "") -> TaskRow:
    spec = task_pb2.TaskSpec(shell=task_pb2.ShellSpec(argv=["echo", str(seq)]))
    return TaskRow(seq, f"t{seq}", key, tenant, 3, spec.SerializeToString(), 1000.0 + seq)


def done(seq: int, final_seq: int, state: int = task_pb2.TASK_STATE_SUCCEEDED) -> FinishedRow:
    result = task_pb2.TaskResult(exit_code=0, stdout=f"{seq}\n").SerializeToString()
    return FinishedRow(f"t{seq}", state, final_seq, 2000.0, 1500.0, "n1", 1, 1, result, seq=seq)


async def test_the_store_is_its_owners_only_even_when_made_open_before(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    old = SqliteStore(data / "s.db")
    await old.open()
    await old.close()
    for made_open in (data / "s.db", data / "s.db-wal", data / "s.db-shm"):
        made_open.touch()
        made_open.chmod(0o644)
    store = SqliteStore(data / "s.db")
    await store.open()
    try:
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        for path in (data / "s.db", data / "s.db-wal", data / "s.db-shm"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    finally:
        await store.close()


async def test_a_new_store_is_made_private(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "new" / "s.db")
    await store.open()
    try:
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "new").iterdir()}
        assert modes == dict.fromkeys(("s.db", "s.db-wal", "s.db-shm", "s.lock", "s.state"), 0o600)
        assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700
    finally:
        await store.close()


async def test_a_full_disk_is_resource_exhausted_with_a_retry_delay_and_heals(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "s.db")
    await store.open()
    await store.insert([row(1)])
    # SQLite answers a write past max_page_count as it answers ENOSPC: SQLITE_FULL.
    await store._write(lambda c: c.execute("PRAGMA max_page_count = 1"))
    big = task_pb2.TaskResult(stdout="x" * 20_000).SerializeToString()
    outcome = FinishedRow("t1", task_pb2.TASK_STATE_SUCCEEDED, 5, 2.0, 1.0, "n1", 1, 1, big, seq=1)
    with pytest.raises(ResourceExhausted, match=STORE_FULL) as full:
        await store.finish([outcome])
    assert full.value.retry_after is not None and full.value.retry_after.total_seconds() > 0
    with pytest.raises(ResourceExhausted, match=STORE_FULL):
        await store.insert([row(2, tenant="x" * 20_000)])
    got = await store.get("t1")  # reads go on
    assert got is not None and got.outcome is None
    assert [r[1] for r in await unfinished(store)] == ["t1"]

    await store._write(lambda c: c.execute("PRAGMA max_page_count = 1000000"))  # space again
    await store.finish([outcome])
    got = await store.get("t1")
    assert got is not None and got.outcome is not None and got.outcome.result == big
    await store.close()


async def test_a_store_is_held_by_one_opener_at_a_time(tmp_path: Path) -> None:
    first = SqliteStore(tmp_path / "s.db")
    await first.open()
    second = SqliteStore(tmp_path / "s.db")
    with pytest.raises(FailedPrecondition, match=rf"in use by pid {os.getpid()}"):
        await second.open()
    await first.close()

    third = SqliteStore(tmp_path / "s.db")
    assert await third.open() == 2
    await third.close()


async def test_the_state_file_follows_the_store_while_it_is_open(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db", mark_interval=timedelta(milliseconds=10))
    await store.open()
    try:
        assert read_marks(tmp_path / "s.state") == Marks(1, 0, 0)
        await store.insert([row(1), row(2), row(3)])
        await store.finish([done(2, 10)])

        def recorded() -> None:
            assert read_marks(tmp_path / "s.state") == Marks(1, 3, 10)

        await eventually(recorded)
    finally:
        await store.close()


async def _older_copy(tmp_path: Path) -> bytes:
    """A store whose database file went back to before its last outcome; returns its bytes."""
    store = SqliteStore(tmp_path / "s.db")
    await store.open()
    await store.insert([row(1), row(2)])
    await store.close()  # the last connection to close folds the WAL into the database
    old = (tmp_path / "s.db").read_bytes()
    store = SqliteStore(tmp_path / "s.db")
    await store.open()
    await store.finish([done(2, (2 << EPOCH_SHIFT) + 3)])  # recorded in epoch 2
    await store.close()
    (tmp_path / "s.db").write_bytes(old)
    return old


async def test_a_store_that_went_back_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    old = await _older_copy(tmp_path)

    store = SqliteStore(tmp_path / "s.db")
    with pytest.raises(FailedPrecondition) as refused:
        await store.open()
    message = refused.value.message
    assert "its epoch is 1, not at least 2" in message
    assert "its last outcome is none, not at least 3 of epoch 2" in message
    assert "shoal store accept-loss --data-dir" in message
    assert (tmp_path / "s.db").read_bytes() == old
    assert not (tmp_path / "s.db-wal").exists() or not (tmp_path / "s.db-wal").stat().st_size


async def test_accepting_the_loss_goes_on_past_every_epoch_used(tmp_path: Path) -> None:
    await _older_copy(tmp_path)

    store = SqliteStore(tmp_path / "s.db", accept_loss=True)
    # The database says epoch 1, but epoch 2 was used (the state file says so): never again.
    assert await store.open() == 3
    assert [r[1] for r in await unfinished(store)] == ["t1", "t2"]
    await store.close()
    assert read_marks(tmp_path / "s.state") == Marks(3, 2, 0)
    store = SqliteStore(tmp_path / "s.db")
    assert await store.open() == 4
    await store.close()


@pytest.mark.parametrize(("damage", "found"), [("deleted", "missing"), ("zeroed", "empty")])
async def test_a_missing_or_empty_database_is_refused(
    tmp_path: Path, damage: str, found: str
) -> None:
    store = SqliteStore(tmp_path / "s.db")
    await store.open()
    await store.insert([row(1)])
    await store.close()
    if damage == "deleted":
        (tmp_path / "s.db").unlink()
    else:
        (tmp_path / "s.db").write_bytes(b"")

    with pytest.raises(FailedPrecondition, match=f"it is {found}, and s.state says it held"):
        await SqliteStore(tmp_path / "s.db").open()
    assert not (tmp_path / "s.db").exists() or not (tmp_path / "s.db").stat().st_size


async def test_a_damaged_state_file_is_refused(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    await store.open()
    await store.close()
    (tmp_path / "s.state").write_text('{"epoch": "many"}')

    with pytest.raises(FailedPrecondition, match=r"its state file s\.state is damaged"):
        await SqliteStore(tmp_path / "s.db").open()


async def test_a_store_from_before_dependency_edges_gets_them_from_its_tasks(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "s.db")
    await store.open()
    child, other = row(2), row(3)
    child.depends_on = ["t1"]
    other.depends_on = ["t1", 0]
    await store.insert([row(1)])
    await store.insert([child, other])
    await store.close()
    # As a release before task_edges left it: no such table, nor the executor index.
    with sqlite3.connect(tmp_path / "s.db") as conn:
        conn.execute("DROP TABLE task_edges")
        conn.execute("DROP INDEX tasks_executor")
    store = SqliteStore(tmp_path / "s.db")
    await store.open()
    assert await store.dependents("t1", 10) == [("t2", ""), ("t3", "")]
    assert await store.dependents("t2", 10) == [("t3", "")]
    await store.close()
