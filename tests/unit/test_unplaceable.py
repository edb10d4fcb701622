"""Tasks no connected node could ever run fail after a grace, unless they wait for a node."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from shoal import docker, shell, tool
from shoal.config import CoreOptions
from shoal.coordinator.engine import Coordinator
from shoal.coordinator.placement import NodeSlots, Scheduler, requirements_of
from shoal.coordinator.store import SqliteStore
from shoal.v1 import node_pb2, task_pb2
from tests.integration.harness import eventually
from tests.unit.test_core import ALICE, NODE, Wall, assignments, finished, hello
from tests.unit.test_scheduler import T

_QUEUED = task_pb2.TASK_STATE_QUEUED
_FAILED = task_pb2.TASK_STATE_FAILED
_SUCCEEDED = task_pb2.TASK_STATE_SUCCEEDED
GRACE = timedelta(seconds=5)
RETURN = timedelta(seconds=8)  # a node that left may be back within this


@pytest.fixture
def wall() -> Wall:
    return Wall()


@pytest.fixture
async def core(tmp_path: Path, wall: Wall) -> AsyncIterator[Coordinator]:
    options = CoreOptions(unplaceable_grace=GRACE, restart_grace=RETURN)
    c = Coordinator(
        SqliteStore(tmp_path / "s.db"), options, clock=wall, wall=wall, rng=random.Random(7)
    )
    await c.start()
    yield c
    await c.stop()


async def followed(core: Coordinator, task_id: str) -> task_pb2.Task:
    """The task once the core knows no connected node can run it (its dispatch has run)."""

    async def known() -> task_pb2.Task:
        task = await core.get(task_id, by=ALICE)
        assert "unless a node that can run it connects" in task.pending_reason, task
        return task

    return await eventually(known)


def tool_node(node_id: str, tools: list[str], slots: int = 1) -> node_pb2.Hello:
    info = node_pb2.NodeInfo(node_id=node_id, executors=["shell", "tool"], slots=slots)
    info.tools.extend(tools)
    return node_pb2.Hello(info=info)


async def test_a_tool_no_node_offers_fails_after_the_grace_with_the_reason(
    core: Coordinator, wall: Wall
) -> None:
    core.attach(tool_node("n1", ["echo"]), "peer", by=NODE)
    (sub,) = await core.submit([tool("nonexistent")], by=ALICE)
    waiting = await followed(core, sub.task_id)
    assert waiting.state == _QUEUED
    assert "no node offers tool 'nonexistent'" in waiting.pending_reason
    wall.now += GRACE.total_seconds() - 1
    core.tick()
    assert (await core.get(sub.task_id, by=ALICE)).state == _QUEUED  # a node may still come
    wall.now += 1
    core.tick()
    task = await core.wait(sub.task_id, None, by=ALICE)
    assert task.state == _FAILED
    assert task.result.error == (
        "FAILED_PRECONDITION: no connected node can run it: none offers tool 'nonexistent'"
    )


async def test_a_task_that_waits_for_a_node_stays_queued_and_runs_when_one_joins(
    core: Coordinator, wall: Wall
) -> None:
    (patient, hasty) = await core.submit(
        [
            shell("true", labels={"gpu": "yes"}, wait_for_node=True),
            shell("true", labels={"gpu": "yes"}),
        ],
        by=ALICE,
    )
    await followed(core, hasty.task_id)
    wall.now += 60
    core.tick()
    assert (await core.wait(hasty.task_id, None, by=ALICE)).state == _FAILED
    waiting = await core.get(patient.task_id, by=ALICE)
    assert waiting.state == _QUEUED
    assert waiting.pending_reason == "no connected node offers executor 'shell'"
    info = node_pb2.NodeInfo(node_id="gpu1", executors=["shell"], slots=1, labels={"gpu": "yes"})
    session = core.attach(node_pb2.Hello(info=info), "peer", by=NODE)
    (a,) = await assignments(session)
    assert a.task_id == patient.task_id
    core.on_message(session, finished(a))
    assert (await core.wait(patient.task_id, None, by=ALICE)).state == _SUCCEEDED


async def test_tasks_that_wait_for_room_are_never_failed_for_it(
    core: Coordinator, wall: Wall
) -> None:
    session = core.attach(hello("n1", slots=1), "peer", by=NODE)
    (running, queued) = await core.submit([shell("true"), shell("true")], by=ALICE)
    (a,) = await assignments(session)
    assert a.task_id == running.task_id
    core.drain("n1", timedelta(seconds=60), leave=False)
    wall.now += 600
    core.tick()
    waiting = await core.get(queued.task_id, by=ALICE)
    assert waiting.state == _QUEUED, waiting.result.error
    assert "fails at" not in waiting.pending_reason


async def test_a_class_whose_only_node_left_fails_once_it_could_have_returned(
    core: Coordinator, wall: Wall
) -> None:
    session = core.attach(tool_node("n1", ["echo"]), "peer", by=NODE)
    (first, second) = await core.submit([tool("echo"), tool("echo")], by=ALICE)
    (a,) = await assignments(session)
    wall.now += 600  # long queued behind a busy node: not a reason to fail
    core.tick()
    assert (await core.get(second.task_id, by=ALICE)).state == _QUEUED
    core.attach(tool_node("n2", ["other"]), "peer", by=NODE)  # a node without it stays
    core.detach(session)  # the only node with the tool leaves
    await followed(core, second.task_id)
    wall.now += RETURN.total_seconds() - 1  # its grace is over, but n1 may be back yet
    core.tick()
    assert (await core.get(second.task_id, by=ALICE)).state == _QUEUED
    wall.now += 1
    core.tick()
    for sub in (first, second):
        task = await core.wait(sub.task_id, None, by=ALICE)
        assert task.state == _FAILED
        assert task.result.error.endswith("no connected node can run it: none offers tool 'echo'")
    assert a.task_id == first.task_id


async def test_after_a_restart_nothing_fails_before_the_restart_grace(
    tmp_path: Path, wall: Wall
) -> None:
    options = CoreOptions(unplaceable_grace=GRACE, restart_grace=timedelta(seconds=30))
    c = Coordinator(SqliteStore(tmp_path / "s.db"), options, clock=wall, wall=wall)
    await c.start()
    c.attach(tool_node("n1", ["echo"]), "peer", by=NODE)
    await c.stop()  # n1 was connected: the next start waits for it
    c = Coordinator(SqliteStore(tmp_path / "s.db"), options, clock=wall, wall=wall)
    await c.start()
    try:
        (sub,) = await c.submit([tool("echo")], by=ALICE)
        await followed(c, sub.task_id)
        wall.now += 29
        c.tick()
        assert (await c.get(sub.task_id, by=ALICE)).state == _QUEUED
        wall.now += 1
        c.tick()
        assert (await c.wait(sub.task_id, None, by=ALICE)).state == _FAILED
    finally:
        await c.stop()


def test_the_scheduler_reports_classes_no_node_could_run_but_not_an_open_breaker() -> None:
    s = Scheduler()
    s.add_node(NodeSlots("n1", frozenset({"shell"}), {}, 1))
    s.set_tripped("n1", frozenset({"shell"}))  # a breaker closes again: not "never"
    shell_task, docker_task = (
        T(1, placement=requirements_of(shell("true"))),
        T(2, placement=requirements_of(docker("alpine"))),
    )
    s.queue.push(shell_task)
    s.queue.push(docker_task)
    assert s.schedule() == []
    assert s.take_unoffered() == [docker_task.placement.cls]
    s.queue.push(
        T(3, placement=requirements_of(docker("alpine")))
    )  # into the parked class: found again
    assert s.take_unoffered() == [docker_task.placement.cls]
    taken, heads = s.take_expired(docker_task.placement.cls, lambda t: t.seq == 2)
    assert (taken, [h.seq for h in heads]) == ([docker_task], [3])
    assert s.unoffered(docker_task.placement.cls) and not s.unoffered(shell_task.placement.cls)
