"""The store contract, run over every backend: SQLite in a temporary directory, and a fresh
database on a real PostgreSQL server (tests/postgres.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from shoal.coordinator.store import (
    FinishedRow,
    SqliteStore,
    Store,
    TaskFilter,
    TaskRow,
    TokenRow,
    UsageRow,
    sqlstore,
)
from shoal.coordinator.store.pgschema import MIGRATIONS, migrate
from shoal.coordinator.store.postgres import PostgresStore
from shoal.coordinator.store.rows import Request, Unfinished
from shoal.errors import FailedPrecondition
from shoal.v1 import task_pb2


@dataclass
class Backend:
    """Makes stores on one place: each `make()` a new Store object over the same data."""

    make: Callable[[], Store]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return Backend(lambda: SqliteStore(tmp_path / "s.db"))
    url: str = request.getfixturevalue("postgres_url")
    return Backend(lambda: PostgresStore(url))


async def unfinished(store: Store) -> list[Unfinished]:
    return [row for page in [p async for p in store.unfinished()] for row in page]


def row(seq: int, key: str | None = None, tenant: str = "") -> TaskRow:
    spec = task_pb2.TaskSpec(shell=task_pb2.ShellSpec(argv=["echo", str(seq)]))
    return TaskRow(seq, f"t{seq}", key, tenant, 3, spec.SerializeToString(), 1000.0 + seq)


def done(seq: int, final_seq: int, state: int = task_pb2.TASK_STATE_SUCCEEDED) -> FinishedRow:
    result = task_pb2.TaskResult(exit_code=0, stdout=f"{seq}\n").SerializeToString()
    return FinishedRow(f"t{seq}", state, final_seq, 2000.0, 1500.0, "n1", 1, 1, result, seq=seq)


async def test_epoch_grows_and_rows_survive_reopen(backend: Backend) -> None:
    store = backend.make()
    assert await store.open() == 1
    assert (await store.insert([row(1), row(2), row(3)]))[0] == [None, None, None]
    await store.finish([done(2, 10)])
    await store.close()

    store = backend.make()
    assert await store.open() == 2
    assert [r[1] for r in await unfinished(store)] == ["t1", "t3"]
    got = await store.get("t2")
    assert got is not None and got.outcome is not None
    assert task_pb2.TaskResult.FromString(got.outcome.result).stdout == "2\n"
    assert await store.get("missing") is None
    await store.close()
    await store.close()  # idempotent


async def test_idempotency_key_returns_existing_id(backend: Backend) -> None:
    store = backend.make()
    await store.open()
    assert (await store.insert([row(1, key="k")]))[0] == [None]
    assert (await store.insert([row(2, key="k"), row(3)]))[0] == ["t1", None]
    assert await store.get("t2") is None
    await store.close()


async def test_batch_indexes_resolve_to_final_ids_and_survive_reopen(backend: Backend) -> None:
    store = backend.make()
    await store.open()
    await store.insert([row(1, key="k")])
    keyed, fresh, child = row(2, key="k"), row(3), row(4)
    child.depends_on = [0, 1, "t1"]  # the keyed row (an existing task), the fresh one, by id
    existing, resolved = await store.insert([keyed, fresh, child])
    assert existing == ["t1", None, None]
    assert resolved[2] == ["t1", "t3", "t1"]
    await store.close()

    store = backend.make()
    await store.open()
    pending = {r[1]: r[5] for r in await unfinished(store)}
    assert pending == {"t1": None, "t3": None, "t4": ["t1", "t3", "t1"]}
    await store.close()


async def test_unfinished_tasks_are_read_page_by_page_in_order(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlstore, "UNFINISHED_PAGE", 7)
    store = backend.make()
    await store.open()
    await store.insert([row(i) for i in range(1, 31)])
    await store.finish([done(5, 100)])
    pages = [[r[0] for r in page] async for page in store.unfinished()]
    assert [len(p) for p in pages] == [7, 7, 7, 7, 1]
    assert [seq for page in pages for seq in page] == [i for i in range(1, 31) if i != 5]

    # A reader that stops early leaves the store usable.
    async for _ in store.unfinished():
        break
    assert (await store.get("t1")) is not None
    await store.close()


async def test_concurrent_writes_share_commits(backend: Backend) -> None:
    store = backend.make()
    await store.open()
    results = await asyncio.gather(*(store.insert([row(i)]) for i in range(1, 201)))
    assert all(r[0] == [None] for r in results)
    assert len(await unfinished(store)) == 200
    await store.close()


async def test_finish_is_recorded_once(backend: Backend) -> None:
    store = backend.make()
    await store.open()
    await store.insert([row(1)])
    await store.finish([done(1, 5, task_pb2.TASK_STATE_FAILED)])
    await store.finish([done(1, 6, task_pb2.TASK_STATE_SUCCEEDED)])  # a late duplicate
    got = await store.get("t1")
    assert got is not None and got.outcome is not None
    assert (got.outcome.state, got.outcome.final_seq) == (task_pb2.TASK_STATE_FAILED, 5)
    await store.close()


async def test_list_filters_and_pages(backend: Backend) -> None:
    store = backend.make()
    await store.open()
    await store.insert([row(i, tenant="a" if i % 2 else "b") for i in range(1, 7)])
    await store.finish([done(1, 20), done(2, 21, task_pb2.TASK_STATE_FAILED)])
    everything = await store.list_tasks(
        before_seq=None, tenant=None, final_states=None, include_unfinished=True, limit=10
    )
    assert [t.row.seq for t in everything] == [6, 5, 4, 3, 2, 1]
    failed = await store.list_tasks(
        before_seq=None,
        tenant=None,
        final_states=[task_pb2.TASK_STATE_FAILED],
        include_unfinished=False,
        limit=10,
    )
    assert [t.row.id for t in failed] == ["t2"]
    page = await store.list_tasks(
        before_seq=5, tenant="a", final_states=None, include_unfinished=True, limit=1
    )
    assert [t.row.id for t in page] == ["t3"]
    await store.close()


async def test_dependents_outlive_their_upstream_and_a_reopen(backend: Backend) -> None:
    store = backend.make()
    await store.open()
    up, other = row(1), row(2)
    await store.insert([up, other])
    a, b, c = row(3, tenant="x"), row(4), row(5)
    a.depends_on = ["t1", "t1"]  # named twice: one edge
    b.depends_on = [0, "t2"]  # a batch index and an id
    c.depends_on = ["t1", 1]
    await store.insert([a, b, c])
    await store.finish([done(1, 20), done(3, 21)])
    assert await store.dependents("t1", 10) == [("t3", "x"), ("t5", "")]
    assert await store.dependents("t1", 1) == [("t3", "x")]
    assert await store.dependents("t3", 10) == [("t4", "")]
    assert await store.dependents("t4", 10) == [("t5", "")]
    assert await store.dependents("t5", 10) == []
    assert await store.dependents("missing", 10) == []
    await store.close()

    store = backend.make()
    await store.open()
    assert await store.dependents("t2", 10) == [("t4", "")]
    await store.close()


def labelled(seq: int, executor: str, labels: list[tuple[str, str]]) -> TaskRow:
    r = row(seq)
    r.executor, r.labels, r.created_at = executor, labels, 1000.0 + seq
    return r


async def test_list_filters_by_executor_labels_and_time_in_the_query(backend: Backend) -> None:
    store = backend.make()
    await store.open()
    rows = [
        labelled(
            i, "shell" if i % 2 else "python", [("team", "ml" if i % 3 else "web"), ("x", "1")]
        )
        for i in range(1, 31)
    ]
    await store.insert(rows)
    await store.finish([done(i, 100 + i) for i in range(1, 31, 4)])

    async def ids(only: TaskFilter, *, limit: int = 100, before: int | None = None) -> list[int]:
        found = await store.list_tasks(
            before_seq=before,
            tenant=None,
            final_states=None,
            include_unfinished=True,
            limit=limit,
            only=only,
        )
        return [t.row.seq for t in found]

    shell = [i for i in range(30, 0, -1) if i % 2]
    assert await ids(TaskFilter(executor="shell")) == shell
    assert await ids(TaskFilter(executor="docker")) == []
    web = [i for i in range(30, 0, -1) if i % 3 == 0]
    assert await ids(TaskFilter(labels=(("team", "web"),))) == web
    both = (("team", "web"), ("x", "1"))
    assert await ids(TaskFilter(executor="shell", labels=both)) == [i for i in web if i % 2]
    assert await ids(TaskFilter(labels=(("team", "web"), ("x", "2")))) == []
    assert await ids(TaskFilter(created_after=1010.0, created_before=1013.0)) == [12, 11, 10]

    # Paging by the last seq of each page gives every match once, in order.
    for only in (TaskFilter(labels=(("team", "ml"),)), TaskFilter(executor="python")):
        every, before, seen = await ids(only), None, []
        while page := await ids(only, limit=4, before=before):
            seen += page
            before = page[-1]
        assert seen == every and every
    # With the state filter applied too (finished ones only).
    finished = await store.list_tasks(
        before_seq=None,
        tenant=None,
        final_states=None,
        include_unfinished=False,
        limit=100,
        only=TaskFilter(labels=(("team", "web"),)),
    )
    assert [t.row.seq for t in finished] == [i for i in web if i % 4 == 1]
    await store.close()


async def test_events_between_orders_acceptances_and_outcomes(backend: Backend) -> None:
    store = backend.make()
    await store.open()
    await store.insert([row(1), row(2), row(4)])
    await store.finish([done(1, 3), done(2, 5)])
    items = await store.events_between(0, 100, 100)
    assert [(seq, st.row.id) for seq, st in items] == [
        (1, "t1"),
        (2, "t2"),
        (3, "t1"),
        (4, "t4"),
        (5, "t2"),
    ]
    # A page cut by the limit never skips an event of the other kind.
    first = await store.events_between(0, 100, 2)
    assert [seq for seq, _ in first] == [1, 2]
    rest = await store.events_between(first[-1][0], 100, 2)
    assert [seq for seq, _ in rest] == [3, 4, 5]
    await store.close()


async def test_attempts_dispatched_since_the_last_record_are_kept_until_the_next(
    backend: Backend,
) -> None:
    store = backend.make()
    await store.open()
    try:
        await store.put_node_attempts({"n1": "t1 1 1"})
        await store.add_dispatched({"n1": "t2 1 1", "n2": "t3 1 1"})
        await store.add_dispatched({"n2": "t1 1 2"})
        assert await store.node_attempts() == {"n1": "t1 1 1\nt2 1 1", "n2": "t3 1 1\nt1 1 2"}
        await store.put_node_attempts({"n2": "t1 1 2"})  # covers what came before
        assert await store.node_attempts() == {"n1": "t1 1 1", "n2": "t1 1 2"}
        await store.add_dispatched({"n1": "t4 1 1"})
        await store.set_member("n1", False)  # forgets its attempts, recorded either way
        assert await store.node_attempts() == {"n2": "t1 1 2"}
    finally:
        await store.close()


async def test_a_resent_request_inserts_nothing_and_answers_the_first_ids(
    backend: Backend,
) -> None:
    store = backend.make()
    await store.open()
    try:
        first = await store.insert([row(1), row(2)], Request("caller\0r1", 10.0))
        assert first[0] == [None, None]
        again = await store.insert([row(3), row(4)], Request("caller\0r1", 11.0))
        assert again[0] == ["t1", "t2"]
        assert await store.get("t3") is None
        with pytest.raises(FailedPrecondition, match="used before for 2 task"):
            await store.insert([row(5)], Request("caller\0r1", 12.0))
        # The refused operation failed alone: a write in the same commit went through.
        results = await asyncio.gather(
            store.insert([row(6)], Request("caller\0r1", 13.0)),
            store.insert([row(7)]),
            return_exceptions=True,
        )
        assert isinstance(results[0], FailedPrecondition)
        assert await store.get("t7") is not None
    finally:
        await store.close()


async def test_the_small_tables_round_trip(backend: Backend) -> None:
    store = backend.make()
    await store.open()
    try:
        token = TokenRow(
            "k1",
            "ci",
            "submitter",
            "",
            "",
            ["shell"],
            {"a": "b"},
            b"\x00h",
            1.5,
            None,
            None,
            "admin",
        )
        await store.put_token(token)
        await store.revoke_token("k1", 9.0)
        (got,) = await store.tokens()
        assert (got.labels, got.executors, got.secret_hash, got.revoked_at) == (
            {"a": "b"},
            ["shell"],
            b"\x00h",
            9.0,
        )

        await store.put_schedule("b", b"\x01")
        await store.put_schedule("a", b"\x02")
        await store.put_schedule("b", b"\x03")
        assert await store.schedules() == [b"\x02", b"\x03"]
        await store.delete_schedule("a")
        await store.delete_schedule("missing")
        assert await store.schedules() == [b"\x03"]

        await store.put_quota("q", b"\x04")
        await store.put_quota("q", b"\x05")
        assert await store.quotas() == [b"\x05"]
        await store.delete_quota("q")
        assert await store.quotas() == []

        await store.add_usage([UsageRow("q", "2026-12", 1, 10, 0.5)])
        await store.add_usage(
            [UsageRow("q", "2026-12", 2, 5, 0.25), UsageRow("r", "2026-12", 1, 0, 0.0)]
        )
        assert sorted(await store.usage(), key=lambda u: u.key) == [
            UsageRow("q", "2026-12", 3, 15, 0.75),
            UsageRow("r", "2026-12", 1, 0, 0.0),
        ]

        await store.put_lease("lock", 3, b"\x06")
        await store.put_lease("lock", 2, b"\x07")  # an older token never lowers the last
        assert await store.lock_tokens() == {"lock": 3}
        await store.delete_lease("lock", 3)
        assert await store.leases() == [b"\x07"]
        assert await store.lock_tokens() == {"lock": 3}

        await store.set_member("n1", True)
        await store.set_member("n1", True)
        await store.set_member("n2", True)
        await store.set_member("n2", False)
        assert await store.members() == ["n1"]
    finally:
        await store.close()


async def test_the_postgresql_migration_gives_older_tasks_their_edges(postgres_url: str) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for version, sql in enumerate(MIGRATIONS[:2], start=1):
            conn.execute(sql)
            conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
        for seq, deps in ((1, "[]"), (2, '["t1"]'), (3, '["t1", "t2"]')):
            conn.execute(
                "INSERT INTO tasks (seq, id, tenant, priority, spec, created_at, depends_on)"
                " VALUES (%s, %s, '', 3, '', 0, %s)",
                (seq, f"t{seq}", deps),
            )
        assert migrate(conn) == (2, len(MIGRATIONS))
    store = PostgresStore(postgres_url)
    await store.open()
    assert await store.dependents("t1", 10) == [("t2", ""), ("t3", "")]
    assert await store.dependents("t2", 10) == [("t3", "")]
    await store.close()
