"""A hostile node: claims beyond its token, results for tasks it does not hold, floods."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from shoal import AsyncClient, shell
from shoal._channel import bearer, open_channel
from shoal.config import CoordinatorSettings, NodeSettings
from shoal.coordinator import sessions
from shoal.coordinator.server import CoordinatorServer
from shoal.node.agent import NodeAgent
from shoal.v1 import admin_pb2, gateway_pb2_grpc, node_pb2, task_pb2

from .harness import STARTUP, collect, eventually, gate_script

pytestmark = pytest.mark.timeout(60)


@dataclass
class Arena:
    coordinator: CoordinatorServer
    honest: NodeAgent
    admin: AsyncClient
    evil_token: str


@pytest.fixture
async def arena(tmp_path: Path) -> AsyncIterator[Arena]:
    coordinator = CoordinatorServer(
        CoordinatorSettings(
            listen="127.0.0.1:0",
            data_dir=tmp_path / "data",
            node_message_rate=200,
            node_message_burst=50,
        )
    )
    await coordinator.start()
    token_file = coordinator.admin_token_path
    honest = NodeAgent(
        NodeSettings(
            coordinator=coordinator.address,
            node_id="honest",
            listen="127.0.0.1:0",
            token_file=token_file,
        )
    )
    await honest.start()
    admin = AsyncClient(coordinator.address, token=token_file.read_text().strip())
    try:
        await asyncio.wait_for(honest.connected.wait(), STARTUP)
        request = admin_pb2.CreateTokenRequest(
            name="evil", role=admin_pb2.ROLE_NODE, executors=["shell"], labels={"zone": "a"}
        )
        made = await admin.create_token(request)
        yield Arena(coordinator, honest, admin, made.token)
    finally:
        await admin.close()
        await honest.stop()
        await coordinator.stop()


class EvilSession:
    """A raw node session over a real channel, speaking the protocol by hand."""

    def __init__(self, arena: Arena, info: node_pb2.NodeInfo) -> None:
        self.channel = open_channel(arena.coordinator.address, max_message_bytes=16 << 20)
        self.call = gateway_pb2_grpc.NodeGatewayStub(self.channel).Connect(
            metadata=bearer(arena.evil_token), timeout=30
        )
        self.info = info

    async def hello(self) -> node_pb2.CoordinatorMessage:
        await self.call.write(node_pb2.NodeMessage(hello=node_pb2.Hello(info=self.info)))
        first: node_pb2.CoordinatorMessage = await self.call.read()
        return first

    async def send(self, *updates: node_pb2.TaskUpdate) -> None:
        await self.call.write(node_pb2.NodeMessage(updates=node_pb2.UpdateBatch(updates=updates)))

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()


def info(**kw: object) -> node_pb2.NodeInfo:
    base: dict[str, object] = {
        "node_id": "evil",
        "executors": ["shell"],
        "labels": {"zone": "a"},
        "slots": 4,
    }
    return node_pb2.NodeInfo(**{**base, **kw})  # type: ignore[arg-type]


def finished(task_id: str, attempt: task_pb2.AttemptId, stdout: str) -> node_pb2.TaskUpdate:
    return node_pb2.TaskUpdate(
        task_id=task_id,
        attempt=attempt,
        finished=node_pb2.Finished(
            state=task_pb2.TASK_STATE_SUCCEEDED, result=task_pb2.TaskResult(stdout=stdout)
        ),
    )


@pytest.mark.parametrize(
    "claim",
    [
        {"node_id": "honest"},
        {"executors": ["shell", "docker"]},
        {"labels": {"zone": "b"}},
        {"labels": {"zone": "a", "gpu": "true"}},
    ],
    ids=["another-node-id", "executor", "label-value", "extra-label"],
)
async def test_claims_beyond_the_token_are_refused(arena: Arena, claim: dict[str, object]) -> None:
    session = EvilSession(arena, info(**claim))
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await session.hello()
    finally:
        await session.close()
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert [n.info.node_id for n in await arena.admin.nodes()] == ["honest"]


async def test_results_for_tasks_it_does_not_hold_change_nothing(
    arena: Arena, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    held = await arena.admin.submit(shell(gate_script(gate, "echo honest")))
    await eventually(
        lambda: _state(arena, held.id, task_pb2.TASK_STATE_RUNNING), retry_on=(AssertionError,)
    )
    running = await arena.admin.get(held.id)
    session = EvilSession(arena, info())
    try:
        assert (await session.hello()).HasField("welcome")
        await session.send(
            finished(held.id, running.attempt, "forged"),  # the honest node's task and attempt
            finished("no-such-task", running.attempt, "forged"),
            node_pb2.TaskUpdate(
                task_id=held.id,
                attempt=running.attempt,
                output=task_pb2.OutputChunk(data="forged output"),
            ),
        )
        nodes = await arena.admin.nodes()  # a round trip after the updates were sent
        assert {n.info.node_id for n in nodes} == {"honest", "evil"}
        assert (await arena.admin.get(held.id)).state == task_pb2.TASK_STATE_RUNNING
    finally:
        await session.close()
    gate.touch()
    done = await arena.admin.wait(held.id)
    assert done.result.stdout == "honest\n"
    assert done.node_id == "honest"
    events = await _events(arena.admin, done)
    assert all(e.principal != "evil" for e in events)
    assert all("forged" not in e.output.data for e in events)


async def test_stale_attempts_are_fenced_off(arena: Arena) -> None:
    task = await arena.admin.submit(shell(["true"], labels={"zone": "a"}))  # only evil has zone=a
    session = EvilSession(arena, info())
    try:
        assert (await session.hello()).HasField("welcome")
        message = await session.call.read()
        (assignment,) = message.assignments.assignments
        current = assignment.attempt
        for stale in (
            task_pb2.AttemptId(epoch=current.epoch, number=current.number + 1),
            task_pb2.AttemptId(epoch=current.epoch - 1, number=current.number),
            task_pb2.AttemptId(),
        ):
            await session.send(finished(task.id, stale, "stale"))
        await arena.admin.nodes()
        assert (await arena.admin.get(task.id)).state == task_pb2.TASK_STATE_ASSIGNED
        await session.send(finished(task.id, current, "current"))
        done = await arena.admin.wait(task.id)
    finally:
        await session.close()
    assert done.state == task_pb2.TASK_STATE_SUCCEEDED
    assert done.result.stdout == "current"


async def test_a_heartbeat_flood_is_rate_limited_and_changes_nothing(arena: Arena) -> None:
    before = await arena.admin.list()
    session = EvilSession(arena, info())
    try:
        assert (await session.hello()).HasField("welcome")
        flood = node_pb2.NodeMessage(heartbeat=node_pb2.Heartbeat(free_slots=1_000_000))
        for _ in range(300):  # six times the burst of 50, at a limit of 200 a second
            await session.call.write(flood)
        # The coordinator keeps serving others while it reads the flood slowly.
        assert await arena.admin.list() == before

        async def throttled() -> int:
            (evil,) = [n for n in await arena.admin.nodes() if n.info.node_id == "evil"]
            assert evil.throttled > 0
            return evil.throttled

        assert await eventually(throttled) > 0
    finally:
        await session.close()
    assert await arena.admin.list() == before


async def _state(arena: Arena, task_id: str, state: int) -> None:
    assert (await arena.admin.get(task_id)).state == state


async def _events(client: AsyncClient, task: task_pb2.Task) -> list[task_pb2.Event]:
    watch = client.watch(since=task.created_seq - 1, task_ids=[task.id], output=True)
    return await collect(watch, lambda e: e.state == task.state and not e.HasField("output"))


async def test_a_node_that_does_not_read_what_it_is_sent_is_sent_no_more(
    arena: Arena, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each spec sent to a node that never reads its stream stays in the coordinator's memory
    (and gRPC's): beyond MAX_UNREAD_BYTES it is sent no more until it speaks of them."""
    monkeypatch.setattr(sessions, "MAX_UNREAD_BYTES", 100_000)
    session = EvilSession(arena, info(slots=64))  # only evil has zone=a
    try:
        assert (await session.hello()).HasField("welcome")
        big = "x" * 20_000
        ids = await arena.admin.submit_batch(
            [shell(["true"], env={"PAD": big}, labels={"zone": "a"}) for _ in range(30)]
        )

        async def placed() -> list[task_pb2.Task]:
            tasks = [await arena.admin.get(i) for i in ids]
            if any(t.state == task_pb2.TASK_STATE_PENDING for t in tasks):
                return []  # not all looked at yet
            return tasks

        tasks = await eventually(placed)
        sent = [t for t in tasks if t.state == task_pb2.TASK_STATE_ASSIGNED]
        waiting = [t for t in tasks if t.state == task_pb2.TASK_STATE_QUEUED]
        assert 5 <= len(sent) <= 6 and len(sent) + len(waiting) == 30  # 100 KB of 20 KB specs
        assert "has not read the tasks sent to it" in waiting[0].pending_reason
        # It reads them (says they started): it is sent more.
        for t in sent:
            started = node_pb2.TaskUpdate(task_id=t.id, attempt=t.attempt)
            started.started.SetInParent()
            await session.send(started)

        async def more() -> bool:
            states = [(await arena.admin.get(i)).state for i in ids]
            return states.count(task_pb2.TASK_STATE_ASSIGNED) >= 5

        await eventually(more)
    finally:
        await session.close()
