"""The coordinator core without gRPC: dispatch, fencing, requeue on node loss, recovery."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from shoal import retry, shell
from shoal.auth import Principal, Role
from shoal.config import CoreOptions
from shoal.coordinator.engine import Coordinator
from shoal.coordinator.sessions import MAX_PENDING_CANCELS, NodeSession
from shoal.coordinator.store import STORE_FULL, SqliteStore
from shoal.errors import InvalidArgument, ResourceExhausted
from shoal.v1 import node_pb2, task_pb2
from tests.integration.harness import eventually

ALICE = Principal("alice", Role.SUBMITTER)
NODE = Principal("fleet", Role.ADMIN)  # may connect under any node id
ADMIN = Principal("root", Role.ADMIN)
_PENDING = task_pb2.TASK_STATE_PENDING


@pytest.fixture
async def core(tmp_path: Path) -> AsyncIterator[Coordinator]:
    c = Coordinator(SqliteStore(tmp_path / "s.db"))
    await c.start()
    yield c
    await c.stop()


def hello(
    node_id: str, slots: int = 2, running: list[node_pb2.RunningAttempt] | None = None
) -> node_pb2.Hello:
    info = node_pb2.NodeInfo(node_id=node_id, executors=["shell"], slots=slots)
    return node_pb2.Hello(info=info, running=running or [])


async def assignments(session: NodeSession) -> list[node_pb2.Assignment]:
    messages = await session.outgoing()
    assert messages is not None
    return [a for m in messages for a in m.assignments.assignments]


def finished(a: node_pb2.Assignment, code: int = 0) -> node_pb2.NodeMessage:
    state = task_pb2.TASK_STATE_SUCCEEDED if code == 0 else task_pb2.TASK_STATE_FAILED
    update = node_pb2.TaskUpdate(
        task_id=a.task_id,
        attempt=a.attempt,
        finished=node_pb2.Finished(state=state, result=task_pb2.TaskResult(exit_code=code)),
    )
    return node_pb2.NodeMessage(updates=node_pb2.UpdateBatch(updates=[update]))


async def test_dispatch_respects_slots_and_records_outcome(core: Coordinator) -> None:
    done = await core.submit([shell("true") for _ in range(3)], by=ALICE)
    session = core.attach(hello("n1", slots=2), "peer", by=NODE)
    first = await assignments(session)
    assert len(first) == 2
    core.on_message(session, finished(first[0]))
    task = await core.wait(first[0].task_id, None, by=ALICE)
    assert task.state == task_pb2.TASK_STATE_SUCCEEDED
    assert [a.task_id for a in await assignments(session)] == [done[2].task_id]


async def test_a_task_skipped_as_it_is_submitted_leaves_the_queue_as_it_was(
    core: Coordinator,
) -> None:
    """Its upstream had failed already: it is never queued, and the next task still runs
    (the queue counted it out once too often: the next task waited for one after it)."""
    session = core.attach(hello("n1", slots=1), "peer", by=NODE)
    (failing,) = await core.submit([shell("false")], by=ALICE)
    (a,) = await assignments(session)
    core.on_message(session, finished(a, code=1))
    assert (await core.wait(failing.task_id, None, by=ALICE)).state == task_pb2.TASK_STATE_FAILED
    (dependent,) = await core.submit([shell("true", depends_on=[failing.task_id])], by=ALICE)
    skipped = await core.wait(dependent.task_id, None, by=ALICE)
    assert skipped.state == task_pb2.TASK_STATE_SKIPPED
    (later,) = await core.submit([shell("true")], by=ALICE)
    assert [a.task_id for a in await assignments(session)] == [later.task_id]


async def test_stale_attempt_is_fenced(core: Coordinator) -> None:
    (done,) = await core.submit([shell("true")], by=ALICE)
    s1 = core.attach(hello("n1"), "peer", by=NODE)
    (old,) = await assignments(s1)
    core.detach(s1)  # node lost: the task goes back to the queue
    s2 = core.attach(hello("n2"), "peer", by=NODE)
    (new,) = await assignments(s2)
    assert new.attempt.number == old.attempt.number + 1
    core.on_message(s2, finished(old, code=1))  # the old attempt's result arrives late
    assert (await core.get(done.task_id, by=ALICE)).state == task_pb2.TASK_STATE_ASSIGNED
    core.on_message(s2, finished(new))
    assert (await core.wait(done.task_id, None, by=ALICE)).state == task_pb2.TASK_STATE_SUCCEEDED


async def test_cancel_queued_is_final_at_once(core: Coordinator) -> None:
    (done,) = await core.submit([shell("true")], by=ALICE)
    task = await core.cancel(done.task_id, by=ALICE)
    assert task.state == task_pb2.TASK_STATE_CANCELLED
    session = core.attach(hello("n1"), "peer", by=NODE)
    assert session.slots.running == 0


async def test_watch_replays_from_the_store_after_restart(tmp_path: Path) -> None:
    c = Coordinator(SqliteStore(tmp_path / "s.db"))
    await c.start()
    done = await c.submit([shell("true")], by=ALICE)
    since = done[0].seq - 1
    await c.stop()
    c = Coordinator(SqliteStore(tmp_path / "s.db"))
    await c.start()
    try:
        stream = c.watch(since=since, by=ALICE)
        cursor, first = await anext(stream)
        assert first == [] and cursor == since
        _, replayed = await anext(stream)
        assert [(e.task_id, e.state) for e in replayed] == [
            (done[0].task_id, task_pb2.TASK_STATE_QUEUED)
        ]
        await stream.aclose()  # type: ignore[attr-defined]
    finally:
        await c.stop()


async def test_a_restart_queues_plain_tasks_from_their_row_and_parses_the_others(
    tmp_path: Path,
) -> None:
    c = Coordinator(SqliteStore(tmp_path / "s.db"))
    await c.start()
    plain = shell("echo plain")
    plain.priority = task_pb2.PRIORITY_HIGH
    plain.tenant = "t1"
    labelled = shell("echo labelled")
    labelled.required_labels["gpu"] = "a100"
    later = shell("echo later")
    later.not_before.FromSeconds(int(time.time()) + 3600)
    ids = [d.task_id for d in await c.submit([plain, labelled, later], by=ADMIN)]
    await c.stop()
    with sqlite3.connect(tmp_path / "s.db") as db:
        rows = dict(db.execute("SELECT id, placement FROM tasks").fetchall())
    assert rows[ids[0]] is not None and rows[ids[1]] is None and rows[ids[2]] is None

    c = Coordinator(SqliteStore(tmp_path / "s.db"))
    await c.start()
    try:
        session = c.attach(hello("n1", slots=3), "peer", by=NODE)
        (a,) = await assignments(session)
        assert a.task_id == ids[0] and a.spec == plain
        assert (await c.get(ids[0], by=ADMIN)).spec.priority == task_pb2.PRIORITY_HIGH
        held = await c.get(ids[1], by=ADMIN)
        assert held.state == task_pb2.TASK_STATE_QUEUED and "gpu=a100" in held.pending_reason
        assert (await c.get(ids[2], by=ADMIN)).state == task_pb2.TASK_STATE_PENDING
        assert c.unfinished_count == {"t1": 1, "": 2}
    finally:
        await c.stop()


async def test_a_flood_of_updates_for_unknown_attempts_holds_bounded_memory(
    core: Coordinator,
) -> None:
    session = core.attach(hello("n1"), "peer", by=NODE)
    attempt = task_pb2.AttemptId(epoch=core.epoch, number=1)
    for batch in range(3):
        updates = [
            node_pb2.TaskUpdate(
                task_id=f"forged-{batch}-{i}", attempt=attempt, started=node_pb2.Started()
            )
            for i in range(MAX_PENDING_CANCELS)
        ]
        core.on_message(
            session, node_pb2.NodeMessage(updates=node_pb2.UpdateBatch(updates=updates))
        )
    messages = await session.outgoing()
    assert messages is not None
    cancels = [c for m in messages for c in m.cancels.attempts]
    assert len(cancels) == MAX_PENDING_CANCELS
    assert await core.list_tasks(states=[], tenant="", limit=10, page_token="", by=ALICE) == (
        [],
        "",
    )


class Wall:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_time_moves_tasks_under_an_injected_clock(tmp_path: Path) -> None:
    wall = Wall()
    c = Coordinator(SqliteStore(tmp_path / "s.db"), clock=wall, wall=wall, rng=random.Random(7))
    await c.start()
    try:
        later = shell("true")
        later.not_before.FromNanoseconds(int((wall.now + 60) * 1e9))
        expiring = shell(
            "true", labels={"gpu": "yes"}, queue_timeout=timedelta(seconds=30), wait_for_node=True
        )
        flaky = shell("false", retry=retry(2, backoff=timedelta(seconds=10)))
        (held, stale, failing) = await c.submit([later, expiring, flaky], by=ALICE)
        session = c.attach(hello("n1", slots=4), "peer", by=NODE)
        (first,) = await assignments(session)
        assert first.task_id == failing.task_id
        c.on_message(session, finished(first, code=1))
        backing_off = await c.get(failing.task_id, by=ALICE)
        assert backing_off.state == task_pb2.TASK_STATE_PENDING
        assert "attempt 2 of 2" in backing_off.pending_reason

        wall.now += 31  # the queue timeout passes; the backoff (5-10 s) too
        c.tick()
        (second,) = await assignments(session)
        assert second.task_id == failing.task_id
        assert second.attempt.number == first.attempt.number + 1
        timed_out = await c.wait(stale.task_id, None, by=ALICE)
        assert timed_out.state == task_pb2.TASK_STATE_TIMED_OUT
        assert (await c.get(held.task_id, by=ALICE)).state == task_pb2.TASK_STATE_PENDING

        wall.now += 30  # not_before reached
        c.tick()
        (third,) = await assignments(session)
        assert third.task_id == held.task_id
        c.on_message(session, finished(second, code=1))
        done = await c.wait(failing.task_id, None, by=ALICE)
        assert done.state == task_pb2.TASK_STATE_FAILED  # two attempts in all
        assert len(done.attempts) == 1
    finally:
        await c.stop()


async def test_backpressure_caps_unfinished_tasks_and_says_when_to_retry(tmp_path: Path) -> None:
    options = CoreOptions(max_queued=3, max_queued_per_tenant=2)
    c = Coordinator(SqliteStore(tmp_path / "s.db"), options)
    await c.start()
    try:
        a = await c.submit([shell("true", tenant="a")] * 2, by=ADMIN)
        with pytest.raises(ResourceExhausted, match="tenant 'a'") as per_tenant:
            await c.submit([shell("true", tenant="a")], by=ADMIN)
        await c.submit([shell("true", tenant="b")], by=ADMIN)
        with pytest.raises(ResourceExhausted, match="3 tasks are unfinished") as total:
            await c.submit([shell("true", tenant="b")], by=ADMIN)
        with pytest.raises(ResourceExhausted) as never:
            await c.submit([shell("true", tenant="c")] * 4, by=ADMIN)
        assert per_tenant.value.retry_after == timedelta(seconds=1)
        # The first refusal: no drain rate measured yet, so back in about a quarter second.
        assert total.value.retry_after is not None
        assert 0.2 <= total.value.retry_after.total_seconds() <= 0.3
        assert never.value.retry_after is None  # larger than the cap: waiting cannot help
        assert (
            len((await c.list_tasks(states=[], tenant="", limit=10, page_token="", by=ADMIN))[0])
            == 3
        )

        await c.cancel(a[0].task_id, by=ADMIN)  # a finished task makes room
        await c.submit([shell("true", tenant="a")], by=ADMIN)
    finally:
        await c.stop()


@pytest.mark.parametrize(
    "claim",
    [
        node_pb2.NodeInfo(slots=100_000),
        node_pb2.NodeInfo(resources=node_pb2.Resources(cpus=1 << 20)),
        node_pb2.NodeInfo(resources=node_pb2.Resources(memory_mb=1 << 40)),
        node_pb2.NodeInfo(resources=node_pb2.Resources(gpus=100_000)),
        node_pb2.NodeInfo(weight=float("nan")),
        node_pb2.NodeInfo(weight=1e300),
        node_pb2.NodeInfo(tools=[f"t{i}" for i in range(1000)]),
    ],
)
async def test_a_hello_claiming_more_than_a_node_can_have_is_refused(
    core: Coordinator, claim: node_pb2.NodeInfo
) -> None:
    token = Principal("shell-only", Role.NODE, node_id="n1", executors=frozenset({"shell"}))
    info = node_pb2.NodeInfo(node_id="n1", executors=["shell"], slots=2)
    info.MergeFrom(claim)
    with pytest.raises(InvalidArgument, match="over its bounds"):
        core.attach(node_pb2.Hello(info=info), "peer", by=token)
    assert core.nodes() == []


async def test_models_and_tools_count_only_with_an_executor_that_serves_them(
    core: Coordinator,
) -> None:
    token = Principal("shell-only", Role.NODE, node_id="n1", executors=frozenset({"shell"}))
    info = node_pb2.NodeInfo(
        node_id="n1",
        executors=["shell"],
        models=["llama3"],
        ollama_models=["llama3"],
        tools=["mail"],
        llm_providers=["openai"],
    )
    session = core.attach(node_pb2.Hello(info=info), "peer", by=token)
    assert (session.slots.models, session.slots.tools, session.slots.providers) == (
        frozenset(),
        frozenset(),
        frozenset(),
    )
    (status,) = core.nodes()
    assert not status.info.models and not status.info.ollama_models


async def test_upstream_values_too_large_to_send_fail_the_task_and_free_its_slot(
    tmp_path: Path,
) -> None:
    c = Coordinator(SqliteStore(tmp_path / "s.db"), CoreOptions(max_rendered_spec_bytes=1000))
    await c.start()
    try:
        ref = "${{ deps[0].stdout }}"
        _, too_large, fits = await c.submit(
            [
                shell("true"),
                shell(["echo", ref, ref], depends_on=[0]),  # 2 x 600 bytes filled in
                shell(["echo", ref], depends_on=[0]),
            ],
            by=ALICE,
        )
        session = c.attach(hello("n1", slots=1), "peer", by=NODE)
        (first,) = await assignments(session)
        result = task_pb2.TaskResult(stdout="x" * 600)
        update = node_pb2.TaskUpdate(
            task_id=first.task_id,
            attempt=first.attempt,
            finished=node_pb2.Finished(state=task_pb2.TASK_STATE_SUCCEEDED, result=result),
        )
        c.on_message(session, node_pb2.NodeMessage(updates=node_pb2.UpdateBatch(updates=[update])))

        failed = await c.wait(too_large.task_id, None, by=ALICE)
        assert failed.state == task_pb2.TASK_STATE_FAILED
        assert failed.result.error == (
            "RESOURCE_EXHAUSTED: upstream values over 1000 bytes in all (max_rendered_spec_bytes)"
        )
        (sent,) = await assignments(session)
        assert (sent.task_id, list(sent.spec.shell.argv)) == (fits.task_id, ["echo", "x" * 600])
    finally:
        await c.stop()


async def test_a_result_over_the_limit_keeps_its_value_and_a_call_without_its_value_fails(
    tmp_path: Path,
) -> None:
    """The output tails give way to a function's value; a value too large by itself is
    dropped, and a call that succeeded without it has failed (no value to return)."""
    c = Coordinator(SqliteStore(tmp_path / "s.db"), CoreOptions(max_result_bytes=10_000))
    await c.start()
    try:
        call = task_pb2.TaskSpec(function=task_pb2.FunctionSpec(name="m:f"))
        kept, dropped = await c.submit([call, call], by=ALICE)
        info = node_pb2.NodeInfo(node_id="n1", executors=["function"], slots=2, functions=["m:f"])
        session = c.attach(node_pb2.Hello(info=info), "peer", by=NODE)
        updates = []
        for a, size in zip(await assignments(session), (6_000, 12_000), strict=True):
            result = task_pb2.TaskResult(stdout="o" * 9_000 + "end")
            result.output.fields["value"].string_value = "7" * size
            done = node_pb2.Finished(state=task_pb2.TASK_STATE_SUCCEEDED, result=result)
            updates.append(node_pb2.TaskUpdate(task_id=a.task_id, attempt=a.attempt, finished=done))
        c.on_message(session, node_pb2.NodeMessage(updates=node_pb2.UpdateBatch(updates=updates)))

        ok = await c.wait(kept.task_id, None, by=ALICE)
        assert ok.state == task_pb2.TASK_STATE_SUCCEEDED
        assert ok.result.output.fields["value"].string_value == "7" * 6_000
        assert ok.result.stdout.endswith("end") and ok.result.ByteSize() <= 10_000
        failed = await c.wait(dropped.task_id, None, by=ALICE)
        assert failed.state == task_pb2.TASK_STATE_FAILED
        assert "max_result_bytes" in failed.result.error
    finally:
        await c.stop()


async def test_an_outcome_the_store_cannot_write_is_not_final_until_it_is_recorded(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "s.db")
    c = Coordinator(store)
    await c.start()
    try:
        first, then = await c.submit([shell("true"), shell("true", depends_on=[0])], by=ALICE)
        session = c.attach(hello("n1"), "peer", by=NODE)
        (a,) = await assignments(session)
        await store._write(lambda conn: conn.execute("PRAGMA max_page_count = 1"))  # disk full
        big = task_pb2.TaskResult(exit_code=0, stdout="x" * 20_000)
        update = node_pb2.TaskUpdate(
            task_id=a.task_id,
            attempt=a.attempt,
            finished=node_pb2.Finished(state=task_pb2.TASK_STATE_SUCCEEDED, result=big),
        )
        c.on_message(session, node_pb2.NodeMessage(updates=node_pb2.UpdateBatch(updates=[update])))

        async def unrecorded() -> task_pb2.Task:
            task = await c.get(first.task_id, by=ALICE)
            assert "not recorded yet: " + STORE_FULL in task.pending_reason
            return task

        task = await eventually(unrecorded)
        assert task.state == task_pb2.TASK_STATE_ASSIGNED and not task.HasField("result")
        waited = await c.wait(first.task_id, timedelta(milliseconds=50), by=ALICE)
        assert waited.state == task_pb2.TASK_STATE_ASSIGNED
        listed, _ = await c.list_tasks(states=[], tenant="", limit=10, page_token="", by=ALICE)
        assert {t.state for t in listed} == {task_pb2.TASK_STATE_ASSIGNED, _PENDING}
        with pytest.raises(ResourceExhausted, match=STORE_FULL) as refused:
            await c.submit([shell("echo " + "y" * 20_000)], by=ALICE)
        assert refused.value.retry_after is not None
        assert sum(c.unfinished_count.values()) == 1  # the refused one gave its place back

        await store._write(lambda conn: conn.execute("PRAGMA max_page_count = 1000000"))
        done = await c.wait(first.task_id, None, by=ALICE)  # recorded by itself, then final
        assert done.state == task_pb2.TASK_STATE_SUCCEEDED and done.result == big
        (b,) = await assignments(session)  # the dependent runs
        assert b.task_id == then.task_id
        c.on_message(session, finished(b))
        await c.wait(then.task_id, None, by=ALICE)
    finally:
        await c.stop()
    stored = await _reopened(tmp_path / "s.db", first.task_id)
    assert stored.state == task_pb2.TASK_STATE_SUCCEEDED and stored.attempt == a.attempt


async def _reopened(path: Path, task_id: str) -> task_pb2.Task:
    """The task as a restarted coordinator has it (nothing of it left to run)."""
    c = Coordinator(SqliteStore(path))
    await c.start()
    try:
        assert c.unfinished_count.total() == 0
        return await c.get(task_id, by=ALICE)
    finally:
        await c.stop()


async def test_concurrent_batches_cannot_pass_max_queued_together(tmp_path: Path) -> None:
    c = Coordinator(SqliteStore(tmp_path / "s.db"), CoreOptions(max_queued=50))
    await c.start()
    try:
        await c.submit([shell("true")] * 39 + [shell("true", idempotency_key="k")], by=ALICE)
        batches = [[shell("true")] * 10 for _ in range(8)]
        results = await asyncio.gather(
            *(c.submit(b, by=ALICE) for b in batches), return_exceptions=True
        )
        assert sum(isinstance(r, list) for r in results) == 1
        assert all(isinstance(r, (list, ResourceExhausted)) for r in results)
        assert c.unfinished_count.total() == 50
        listed, _ = await c.list_tasks(states=[], tenant="", limit=100, page_token="", by=ALICE)
        assert len(listed) == 50
        # A resent key creates nothing, so it takes no place either (the cap is full).
        with pytest.raises(ResourceExhausted):
            await c.submit([shell("true", idempotency_key="k")], by=ALICE)
        await c.cancel(listed[0].id, by=ALICE)
        (again,) = await c.submit([shell("true", idempotency_key="k")], by=ALICE)
        assert not again.created and c.unfinished_count.total() == 49
    finally:
        await c.stop()
