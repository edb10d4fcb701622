"""The core under faults: restart reconcile, leases, fencing, circuit breakers, drain."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from shoal import shell
from shoal.auth import Principal, Role
from shoal.config import CoreOptions
from shoal.coordinator.engine import Coordinator
from shoal.coordinator.sessions import NodeSession
from shoal.coordinator.store import SqliteStore
from shoal.errors import FailedPrecondition
from shoal.v1 import node_pb2, task_pb2
from tests.integration.harness import eventually

from .test_core import ADMIN, ALICE, NODE, Wall, assignments, finished, hello

OPEN = task_pb2.BREAKER_STATE_OPEN
HALF_OPEN = task_pb2.BREAKER_STATE_HALF_OPEN
CLOSED = task_pb2.BREAKER_STATE_CLOSED


def infra_failure(a: node_pb2.Assignment) -> node_pb2.NodeMessage:
    result = task_pb2.TaskResult(error="workdir missing", infrastructure_failure=True)
    update = node_pb2.TaskUpdate(
        task_id=a.task_id,
        attempt=a.attempt,
        finished=node_pb2.Finished(state=task_pb2.TASK_STATE_FAILED, result=result),
    )
    return node_pb2.NodeMessage(updates=node_pb2.UpdateBatch(updates=[update]))


def released(a: node_pb2.Assignment) -> node_pb2.NodeMessage:
    update = node_pb2.TaskUpdate(
        task_id=a.task_id, attempt=a.attempt, released=node_pb2.Released(reason="draining")
    )
    return node_pb2.NodeMessage(updates=node_pb2.UpdateBatch(updates=[update]))


def running(a: node_pb2.Assignment) -> node_pb2.RunningAttempt:
    return node_pb2.RunningAttempt(task_id=a.task_id, attempt=a.attempt)


async def messages(session: NodeSession) -> list[node_pb2.CoordinatorMessage]:
    out = await session.outgoing()
    assert out is not None
    return out


@pytest.fixture
def wall() -> Wall:
    return Wall()


@pytest.fixture
async def core(tmp_path: Path, wall: Wall) -> AsyncIterator[Coordinator]:
    options = CoreOptions(breaker_threshold=3, breaker_cooldown=timedelta(seconds=30))
    c = Coordinator(
        SqliteStore(tmp_path / "s.db"), options, clock=wall, wall=wall, rng=random.Random(1)
    )
    await c.start()
    yield c
    await c.stop()


# -- restart ---------------------------------------------------------------------------------


async def test_after_a_restart_a_node_keeps_the_attempts_it_still_runs(tmp_path: Path) -> None:
    c = Coordinator(SqliteStore(tmp_path / "s.db"))
    await c.start()
    done = await c.submit([shell(f"echo {i}") for i in range(4)], by=ALICE)
    n1 = c.attach(hello("n1", slots=2), "peer", by=NODE)
    first, second = await assignments(n1)
    c.on_message(n1, finished(first))
    await c.wait(first.task_id, None, by=ALICE)
    await c.stop()  # as after kill -9: `second` still runs on n1; two tasks never started

    c = Coordinator(SqliteStore(tmp_path / "s.db"))
    await c.start()
    try:
        waiting = await c.get(done[3].task_id, by=ALICE)
        assert waiting.state == task_pb2.TASK_STATE_PENDING
        assert "recovered after a restart" in waiting.pending_reason
        # n1 comes back still running `second`, and claims the finished task too.
        n1 = c.attach(hello("n1", slots=3, running=[running(second), running(first)]), "p", by=NODE)
        await asyncio.sleep(0)  # let the dispatch that attach scheduled run
        out = await messages(n1)
        cancels = [x.task_id for m in out for x in m.cancels.attempts]
        assigned = sorted(x.task_id for m in out for x in m.assignments.assignments)
        assert cancels == [first.task_id]  # already final: that attempt is stale
        # Every node that was connected is back: the grace ends, the rest goes out at once.
        unstarted = sorted(
            d.task_id for d in done if d.task_id not in (first.task_id, second.task_id)
        )
        assert assigned == unstarted
        kept = await c.get(second.task_id, by=ALICE)
        assert kept.state == task_pb2.TASK_STATE_RUNNING
        assert (kept.attempt.epoch, kept.attempt.number) == (1, 1)  # the old epoch's attempt
        c.on_message(n1, finished(second))
        assert (await c.wait(second.task_id, None, by=ALICE)).state == (
            task_pb2.TASK_STATE_SUCCEEDED
        )
    finally:
        await c.stop()


async def test_after_a_restart_only_the_node_an_attempt_went_to_reclaims_it(
    tmp_path: Path,
) -> None:
    c = Coordinator(SqliteStore(tmp_path / "s.db"))
    await c.start()
    ran, never = await c.submit([shell("sleep 60"), shell("true")], by=ALICE)
    n1 = c.attach(hello("n1", slots=1), "peer", by=NODE)
    (a,) = await assignments(n1)
    await c.stop()  # `a` still runs on n1; `never` was never dispatched

    c = Coordinator(SqliteStore(tmp_path / "s.db"))
    await c.start()
    try:
        # Another node's token claims n1's attempt, and one of a task nobody ran.
        forged = node_pb2.RunningAttempt(task_id=never.task_id, attempt=a.attempt)
        intruder = Principal("n2-token", Role.NODE, node_id="n2")
        n2 = c.attach(hello("n2", slots=2, running=[running(a), forged]), "p", by=intruder)
        (told,) = await messages(n2)
        assert sorted(x.task_id for x in told.cancels.attempts) == sorted(
            [ran.task_id, never.task_id]
        )
        c.on_message(n2, finished(a))  # its forged result changes nothing
        assert (await c.get(ran.task_id, by=ALICE)).state == task_pb2.TASK_STATE_PENDING
        n1 = c.attach(hello("n1", slots=1, running=[running(a)]), "p", by=NODE)
        kept = await c.get(ran.task_id, by=ALICE)
        assert (kept.state, kept.node_id) == (task_pb2.TASK_STATE_RUNNING, "n1")
        assert (kept.attempt.epoch, kept.attempt.number) == (a.attempt.epoch, a.attempt.number)
    finally:
        await c.stop()


async def test_the_attempts_each_node_runs_are_recorded_while_the_coordinator_runs(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "s.db")
    c = Coordinator(store)
    await c.start()
    try:
        await c.submit([shell("sleep 60")], by=ALICE)
        n1 = c.attach(hello("n1"), "peer", by=NODE)
        (a,) = await assignments(n1)
        line = f"{a.task_id} {a.attempt.epoch} {a.attempt.number}"

        async def recorded() -> None:  # without a stop: what a kill -9 would leave
            assert await store.node_attempts() == {"n1": line}

        await eventually(recorded)
        c.detach(n1)

        async def forgotten() -> None:
            assert await store.node_attempts() == {}

        await eventually(forgotten)
    finally:
        await c.stop()


async def test_after_a_crash_just_after_dispatch_its_node_reclaims_the_attempt(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "s.db")
    c = Coordinator(store)
    await c.start()
    (task,) = await c.submit([shell("sleep 60")], by=ALICE)
    n1 = c.attach(hello("n1"), "peer", by=NODE)
    (a,) = await assignments(n1)
    # A crash before any sweep recorded what n1 runs: only what the store had queued lands.
    await store.close()

    restarted = Coordinator(SqliteStore(tmp_path / "s.db"))
    await restarted.start()
    try:
        n1 = restarted.attach(hello("n1", running=[running(a)]), "p", by=NODE)
        kept = await restarted.get(task.task_id, by=ALICE)
        assert (kept.state, kept.node_id) == (task_pb2.TASK_STATE_RUNNING, "n1")
        assert (kept.attempt.epoch, kept.attempt.number) == (a.attempt.epoch, a.attempt.number)
        restarted.on_message(n1, finished(a))
        done = await restarted.wait(task.task_id, None, by=ALICE)
        assert done.state == task_pb2.TASK_STATE_SUCCEEDED
        # Recorded as the attempt the node ran, which the epoch before dispatched.
        await restarted.stop()
        reopened = Coordinator(SqliteStore(tmp_path / "s.db"))
        await reopened.start()
        try:
            stored = await reopened.get(task.task_id, by=ALICE)
        finally:
            await reopened.stop()
        assert (
            (stored.attempt.epoch, stored.attempt.number)
            == (1, 1)
            == (
                a.attempt.epoch,
                a.attempt.number,
            )
        )
    finally:
        await restarted.stop()
        await c.stop()


async def test_after_a_restart_a_node_reclaims_only_what_its_token_lets_it_run(
    tmp_path: Path,
) -> None:
    c = Coordinator(SqliteStore(tmp_path / "s.db"))
    await c.start()
    (task,) = await c.submit([shell("sleep 60")], by=ALICE)
    n1 = c.attach(hello("n1"), "peer", by=NODE)
    (a,) = await assignments(n1)
    await c.stop()

    c = Coordinator(SqliteStore(tmp_path / "s.db"))
    await c.start()
    try:
        limited = Principal("n1-token", Role.NODE, node_id="n1", executors=frozenset({"python"}))
        info = node_pb2.NodeInfo(node_id="n1", executors=["python"], slots=2)
        n1 = c.attach(node_pb2.Hello(info=info, running=[running(a)]), "p", by=limited)
        (told,) = await messages(n1)
        assert [x.task_id for x in told.cancels.attempts] == [task.task_id]
        assert (await c.get(task.task_id, by=ALICE)).state == task_pb2.TASK_STATE_QUEUED
    finally:
        await c.stop()


async def test_recovered_tasks_are_queued_when_their_node_does_not_come_back(
    tmp_path: Path, wall: Wall
) -> None:
    options = CoreOptions(restart_grace=timedelta(seconds=10))
    c = Coordinator(SqliteStore(tmp_path / "s.db"), options, clock=wall, wall=wall)
    await c.start()
    (task,) = await c.submit([shell("sleep 60")], by=ALICE)
    c.attach(hello("gone"), "peer", by=NODE)
    await c.stop()

    c = Coordinator(SqliteStore(tmp_path / "s.db"), options, clock=wall, wall=wall)
    await c.start()
    try:
        other = c.attach(hello("other"), "peer", by=NODE)
        assert (await c.get(task.task_id, by=ALICE)).state == task_pb2.TASK_STATE_PENDING
        wall.now += 10
        c.tick()
        (a,) = await assignments(other)
        assert a.task_id == task.task_id
        assert a.attempt.epoch == c.epoch
    finally:
        await c.stop()


# -- leases and fencing ----------------------------------------------------------------------


async def test_heartbeats_are_answered_and_stale_updates_counted(core: Coordinator) -> None:
    (task,) = await core.submit([shell("true")], by=ALICE)
    n1 = core.attach(hello("n1"), "peer", by=NODE)
    (a,) = await assignments(n1)
    core.on_message(n1, node_pb2.NodeMessage(heartbeat=node_pb2.Heartbeat(seq=7)))
    (renewed,) = await messages(n1)
    assert renewed.lease.seq == 7
    core.detach(n1)  # lost: the task runs elsewhere
    n2 = core.attach(hello("n2"), "peer", by=NODE)
    (b,) = await assignments(n2)
    n1 = core.attach(hello("n1", running=[running(a)]), "peer", by=NODE)
    (told,) = await messages(n1)
    assert [x.task_id for x in told.cancels.attempts] == [task.task_id]
    core.on_message(n1, finished(a))  # its late result
    status = {n.info.node_id: n for n in core.nodes()}
    assert status["n1"].stale_updates == 1
    assert (await core.get(task.task_id, by=ALICE)).state == task_pb2.TASK_STATE_ASSIGNED
    core.on_message(n2, finished(b))
    assert (await core.wait(task.task_id, None, by=ALICE)).node_id == "n2"


# -- circuit breakers ------------------------------------------------------------------------


async def test_heartbeats_are_answered_at_least_four_times_a_lease_not_each_one(
    tmp_path: Path,
) -> None:
    now = [0.0]
    c = Coordinator(
        SqliteStore(tmp_path / "s.db"),
        CoreOptions(lease=timedelta(seconds=10), heartbeat_interval=timedelta(seconds=1)),
        clock=lambda: now[0],
    )
    await c.start()
    try:
        n1 = c.attach(hello("n1"), "peer", by=NODE)
        answered = []
        for seq in range(1, 11):  # one a second: the lease is answered every 2.5 s at least
            now[0] = float(seq)
            c.on_message(n1, node_pb2.NodeMessage(heartbeat=node_pb2.Heartbeat(seq=seq)))
            pending = asyncio.ensure_future(n1.outgoing())
            await asyncio.sleep(0)  # what there is to send is returned at once
            if pending.done():
                answered += [m.lease.seq for m in pending.result() or ()]
            else:
                pending.cancel()
        assert answered == [1, 4, 7, 10]
    finally:
        await c.stop()


async def test_many_nodes_heartbeat_less_often_under_longer_leases(tmp_path: Path) -> None:
    now = [0.0]
    c = Coordinator(
        SqliteStore(tmp_path / "s.db"),
        CoreOptions(
            heartbeat_interval=timedelta(seconds=0.1),
            lease=timedelta(seconds=0.4),
            max_heartbeat_rate=10.0,  # one node heartbeating every 0.1 s is all it takes
        ),
        clock=lambda: now[0],
    )
    await c.start()
    try:
        n1 = c.attach(hello("n1"), "peer", by=NODE)
        assert c.welcome(n1).welcome.heartbeat_interval.ToTimedelta() == timedelta(seconds=0.1)
        n2 = c.attach(hello("n2"), "peer", by=NODE)  # two: 0.2 s, spaced to whole seconds
        welcome = c.welcome(n2).welcome
        assert welcome.heartbeat_interval.ToTimedelta() == timedelta(seconds=1)
        assert welcome.lease.ToTimedelta() == timedelta(seconds=4)

        # The first node is told with the answer to its next heartbeat.
        c.on_message(n1, node_pb2.NodeMessage(heartbeat=node_pb2.Heartbeat(seq=1)))
        (renewed,) = [m.lease for m in await messages(n1)]
        assert renewed.seq == 1
        assert renewed.heartbeat_interval.ToTimedelta() == timedelta(seconds=1)
        assert renewed.lease.ToTimedelta() == timedelta(seconds=4)

        # A pace never speeds up within a session: n1 keeps its 4 s lease with n2 gone.
        c.detach(n2)
        now[0] = 2.0  # silent for 5 of the configured leases, half of its own
        c.on_message(n1, node_pb2.NodeMessage(heartbeat=node_pb2.Heartbeat(seq=2)))
        (renewed,) = [m.lease for m in await messages(n1)]
        assert not renewed.HasField("lease")
        now[0] = 5.0
        await asyncio.sleep(0.3)  # the sweep runs every quarter of the configured lease
        assert [n.info.node_id for n in c.nodes()] == ["n1"]
        now[0] = 6.5
        for _ in range(100):
            await asyncio.sleep(0.05)
            if not c.nodes():
                break
        assert c.nodes() == []
    finally:
        await c.stop()


def breakers(core: Coordinator, node_id: str) -> dict[str, tuple[int, int]]:
    (status,) = [n for n in core.nodes() if n.info.node_id == node_id]
    return {b.key: (b.state, b.failures) for b in status.breakers}


async def test_node_breaker_opens_probes_once_and_closes(core: Coordinator, wall: Wall) -> None:
    done = await core.submit([shell(f"echo {i}") for i in range(7)], by=ALICE)
    n1 = core.attach(hello("n1", slots=1), "peer", by=NODE)
    own_failure = (await assignments(n1))[0]
    core.on_message(n1, finished(own_failure, code=1))  # the task's own failure: no count
    for _ in range(3):
        (a,) = await assignments(n1)
        core.on_message(n1, infra_failure(a))
    await core.wait(a.task_id, None, by=ALICE)  # its outcome, and what came after, published
    assert breakers(core, "n1") == {"node:n1": (OPEN, 3), "node:n1/shell": (OPEN, 3)}
    waiting = await core.get(done[4].task_id, by=ALICE)
    assert "circuit breaker" in waiting.pending_reason, waiting.pending_reason
    events = breaker_events(core)
    assert {(e.breaker.key, e.breaker.state) for e in events} == {
        ("node:n1", OPEN),
        ("node:n1/shell", OPEN),
    }
    assert not events[0].task_id

    wall.now += 30
    core.tick()  # half-open: exactly one probe goes
    (probe,) = await assignments(n1)
    assert {k: s for k, (s, _) in breakers(core, "n1").items()} == {
        "node:n1": HALF_OPEN,
        "node:n1/shell": HALF_OPEN,
    }
    core.on_message(n1, infra_failure(probe))  # still broken: open for another cooldown
    assert breakers(core, "n1")["node:n1"][0] == OPEN
    wall.now += 30
    core.tick()
    (probe,) = await assignments(n1)
    core.on_message(n1, finished(probe))  # healthy again
    assert breakers(core, "n1") == {}
    (rest,) = await assignments(n1)
    assert rest.task_id in {d.task_id for d in done}


def breaker_events(core: Coordinator) -> list[task_pb2.Event]:
    held = core.events.after(core.events.oldest_seq - 1) or []
    events = [c.event() for c in held if c is not None]
    return [e for e in events if e.HasField("breaker")]


async def test_backend_breaker_holds_its_tasks_everywhere(core: Coordinator, wall: Wall) -> None:
    specs = [shell("call-api") for _ in range(5)]
    for spec in specs:
        spec.backend = "api.example.com"
    api = await core.submit(specs, by=ALICE)
    n1 = core.attach(hello("n1", slots=1), "peer", by=NODE)
    n2 = core.attach(hello("n2", slots=2), "peer", by=NODE)
    first = await assignments(n1) + await assignments(n2)
    for a in first:  # three infrastructure failures on two nodes
        core.on_message(n1 if a in first[:1] else n2, infra_failure(a))
    await asyncio.sleep(0)  # the next dispatch meets the open breaker
    held = [await core.get(d.task_id, by=ALICE) for d in api[3:]]
    assert {t.state for t in held} == {task_pb2.TASK_STATE_PENDING}
    assert "circuit breaker backend:api.example.com is open" in held[0].pending_reason
    (plain,) = await core.submit([shell("true")], by=ALICE)  # other work still flows
    got = await assignments(n1)
    assert [a.task_id for a in got] == [plain.task_id]

    wall.now += 30
    core.tick()  # one held task goes as the probe
    probes = await assignments(n2)
    assert len(probes) == 1
    core.on_message(n2, finished(probes[0]))
    (last,) = await assignments(n2)
    assert {probes[0].task_id, last.task_id} == {d.task_id for d in api[3:]}


# -- drain -----------------------------------------------------------------------------------


async def test_drained_node_takes_nothing_and_what_it_gives_back_runs_elsewhere(
    core: Coordinator,
) -> None:
    (task,) = await core.submit([shell("sleep 60")], by=ALICE)
    n1 = core.attach(hello("n1"), "peer", by=NODE)
    (a,) = await assignments(n1)
    status = core.drain("n1", timedelta(seconds=5), leave=False)
    assert status.draining
    (drain,) = await messages(n1)
    assert drain.drain.grace.seconds == 5 and not drain.drain.leave
    await core.submit([shell("true")], by=ALICE)
    core.on_message(n1, released(a))  # grace over: given back unfinished
    n2 = core.attach(hello("n2"), "peer", by=NODE)
    again = await assignments(n2)
    assert {x.task_id for x in again} >= {task.task_id}
    rerun = next(x for x in again if x.task_id == task.task_id)
    assert rerun.attempt.number == a.attempt.number + 1  # a new attempt id, for fencing...
    assert not (await core.get(task.task_id, by=ALICE)).attempts  # ...but not a failed one
    core.undrain("n1")
    assert not next(n for n in core.nodes() if n.info.node_id == "n1").draining


# -- resent submits --------------------------------------------------------------------------


async def test_a_resent_request_returns_the_first_ones_tasks(core: Coordinator) -> None:
    keyed = shell("echo keyed", idempotency_key="k1")
    (earlier,) = await core.submit([keyed], by=ALICE)
    specs = [shell("echo a"), keyed, shell("echo b")]
    first = await core.submit(specs, by=ALICE, request_id="req-1")
    assert [s.created for s in first] == [True, False, True]
    assert first[1].task_id == earlier.task_id

    again = await core.submit(specs, by=ALICE, request_id="req-1")  # its answer was lost
    assert [s.task_id for s in again] == [s.task_id for s in first]
    assert not any(s.created for s in again)
    with pytest.raises(FailedPrecondition, match="used before for 3 task"):
        await core.submit(specs[:2], by=ALICE, request_id="req-1")
    other = await core.submit(specs[:1], by=ADMIN, request_id="req-1")  # ids are per caller
    assert other[0].created
    tasks, _ = await core.list_tasks(states=[], tenant="", limit=100, page_token="", by=ADMIN)
    assert len(tasks) == 4
