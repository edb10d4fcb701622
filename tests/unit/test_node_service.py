"""The node's own service in this process, over a real channel: direct Execute, Get, Cancel,
its slots, its health, and who may call it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shoal import python, shell
from shoal.config import NodeSettings
from shoal.errors import AlreadyExists, FailedPrecondition
from shoal.node.agent import NodeAgent
from shoal.node.direct import DirectTasks
from shoal.node.executors.base import Outcome
from shoal.node.guard import Load
from shoal.node.health import NODE_SERVICE, executor_health_name
from shoal.node.slots import Slots
from shoal.v1 import node_pb2, node_pb2_grpc, task_pb2

pytestmark = pytest.mark.timeout(30)

TOKEN = "node-secret"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

MakeNode = Callable[..., Awaitable[NodeAgent]]


@pytest.fixture
async def make_node(tmp_path: Path) -> AsyncIterator[MakeNode]:
    """Starts standalone nodes on loopback port 0 (`await make(**settings)`); stops them all."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(**settings: Any) -> NodeAgent:
            agent = NodeAgent(
                NodeSettings(
                    **{
                        "standalone": True,
                        "listen": "127.0.0.1:0",
                        "token": TOKEN,
                        "slots": 2,
                        "guard": False,
                        "workdir": tmp_path,
                        **settings,
                    }
                )
            )
            await agent.start()
            stack.push_async_callback(lambda: asyncio.wait_for(agent.stop(), 20))
            return agent

        yield make


@pytest.fixture
async def node(make_node: MakeNode) -> NodeAgent:
    return await make_node()


@pytest.fixture
async def channel(node: NodeAgent) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{node.port}") as channel:
        yield channel


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> node_pb2_grpc.NodeStub:
    return node_pb2_grpc.NodeStub(channel)


def execute(
    stub: node_pb2_grpc.NodeStub, spec: task_pb2.TaskSpec, task_id: str = ""
) -> grpc.aio.UnaryStreamCall[node_pb2.ExecuteRequest, node_pb2.ExecuteUpdate]:
    return stub.Execute(
        node_pb2.ExecuteRequest(spec=spec, task_id=task_id), metadata=AUTH, timeout=20
    )


async def first_update(
    call: grpc.aio.UnaryStreamCall[node_pb2.ExecuteRequest, node_pb2.ExecuteUpdate],
) -> node_pb2.ExecuteUpdate:
    update = await call.read()
    assert isinstance(update, node_pb2.ExecuteUpdate), update
    return update


async def rest(
    call: grpc.aio.UnaryStreamCall[node_pb2.ExecuteRequest, node_pb2.ExecuteUpdate],
) -> list[node_pb2.ExecuteUpdate]:
    out: list[node_pb2.ExecuteUpdate] = []
    while (update := await call.read()) is not grpc.aio.EOF:
        assert isinstance(update, node_pb2.ExecuteUpdate)
        out.append(update)
    return out


async def status_of(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(response.status)


async def eventually(check: Callable[[], Awaitable[None]], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            try:
                await check()
                return
            except AssertionError:
                await asyncio.sleep(0.02)


# -- Execute, Get, Cancel ------------------------------------------------------------------


async def test_execute_streams_start_output_and_the_final_result(
    stub: node_pb2_grpc.NodeStub,
) -> None:
    updates = await rest(execute(stub, shell("echo one; echo two >&2; exit 3")))

    kinds = [u.WhichOneof("update") for u in updates]
    assert kinds[0] == "started" and kinds[-1] == "finished"
    assert set(kinds[1:-1]) == {"output"}
    assert len({u.task_id for u in updates}) == 1 and updates[0].task_id
    out = [u.output for u in updates if u.HasField("output")]
    stdout = "".join(c.data for c in out if c.stream == task_pb2.OUTPUT_STREAM_STDOUT)
    stderr = "".join(c.data for c in out if c.stream == task_pb2.OUTPUT_STREAM_STDERR)
    assert (stdout, stderr) == ("one\n", "two\n")
    assert updates[0].started.state == task_pb2.TASK_STATE_RUNNING
    final = updates[-1].finished
    assert final.state == task_pb2.TASK_STATE_FAILED
    assert final.result.exit_code == 3
    assert final.result.stdout == "one\n"
    assert final.started_at.seconds > 0 and final.finished_at.seconds > 0


async def test_get_reads_a_task_after_its_stream_ended(stub: node_pb2_grpc.NodeStub) -> None:
    updates = await rest(execute(stub, python("print(6 * 7)"), task_id="mine"))
    assert updates[-1].task_id == "mine"

    got = await stub.Get(node_pb2.NodeTaskRef(task_id="mine"), metadata=AUTH, timeout=5)

    assert got.id == "mine"
    assert got.state == task_pb2.TASK_STATE_SUCCEEDED
    assert got.result.stdout == "42\n"
    assert got.started_at.ToNanoseconds() <= got.finished_at.ToNanoseconds()
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.Get(node_pb2.NodeTaskRef(task_id="other"), metadata=AUTH, timeout=5)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_cancel_stops_a_sleeping_task_and_frees_its_slot(
    node: NodeAgent, stub: node_pb2_grpc.NodeStub
) -> None:
    call = execute(stub, shell("echo $$; exec sleep 60"), task_id="sleeper")
    assert (await first_update(call)).HasField("started")
    pid = int((await first_update(call)).output.data)
    assert node.slots.free == 1

    cancelled = await stub.Cancel(
        node_pb2.NodeTaskRef(task_id="sleeper"), metadata=AUTH, timeout=10
    )

    assert cancelled.state == task_pb2.TASK_STATE_CANCELLED
    assert cancelled.finished_at.seconds > 0
    last = (await rest(call))[-1]
    assert last.finished.state == task_pb2.TASK_STATE_CANCELLED
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert node.slots.free == 2
    again = await stub.Cancel(node_pb2.NodeTaskRef(task_id="sleeper"), metadata=AUTH, timeout=5)
    assert again.state == task_pb2.TASK_STATE_CANCELLED  # a finished task, as it is


async def test_a_task_outlives_a_caller_that_went_away(
    node: NodeAgent, stub: node_pb2_grpc.NodeStub, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    call = execute(stub, shell(f"until [ -e {gate} ]; do sleep 0.02; done; echo through"), "t")
    assert (await first_update(call)).HasField("started")
    call.cancel()
    gate.touch()

    async def finished() -> None:
        got = await stub.Get(node_pb2.NodeTaskRef(task_id="t"), metadata=AUTH, timeout=5)
        assert got.state == task_pb2.TASK_STATE_SUCCEEDED, got
        assert got.result.stdout == "through\n"

    await eventually(finished)


async def test_beyond_its_slots_execute_is_resource_exhausted_and_changes_nothing(
    node: NodeAgent, stub: node_pb2_grpc.NodeStub
) -> None:
    calls = [execute(stub, shell(["sleep", "60"]), task_id=f"s{i}") for i in range(2)]
    for call in calls:
        assert (await first_update(call)).HasField("started")

    with pytest.raises(grpc.aio.AioRpcError) as full:
        await rest(execute(stub, shell(["echo", "one too many"]), task_id="third"))

    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "no free slot" in str(full.value.details())
    assert len(node.direct) == 2
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stub.Get(node_pb2.NodeTaskRef(task_id="third"), metadata=AUTH, timeout=5)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    for i in range(2):
        await stub.Cancel(node_pb2.NodeTaskRef(task_id=f"s{i}"), metadata=AUTH, timeout=10)
    assert node.slots.free == 2


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (task_pb2.TaskSpec(shell=task_pb2.ShellSpec()), "spec.shell"),
        (task_pb2.TaskSpec(), "spec.kind"),
        (shell(["true"], depends_on=["abc"]), "spec.depends_on"),
        (shell(["echo", "${{ deps[0].stdout }}"]), "spec.shell.argv[1]"),
    ],
)
async def test_a_bad_spec_is_invalid_argument_and_changes_nothing(
    node: NodeAgent, stub: node_pb2_grpc.NodeStub, spec: task_pb2.TaskSpec, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await rest(execute(stub, spec))

    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in str(bad.value.details())
    assert len(node.direct) == 0 and node.slots.free == 2


async def test_an_executor_the_node_lacks_is_a_failed_precondition(
    node: NodeAgent, stub: node_pb2_grpc.NodeStub
) -> None:
    spec = task_pb2.TaskSpec(docker=task_pb2.DockerSpec(image="alpine"))

    with pytest.raises(grpc.aio.AioRpcError) as lacking:
        await rest(execute(stub, spec))

    assert lacking.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "docker" in str(lacking.value.details())
    assert len(node.direct) == 0


async def test_a_task_id_in_use_is_already_exists(
    node: NodeAgent, stub: node_pb2_grpc.NodeStub
) -> None:
    await rest(execute(stub, shell(["true"]), task_id="once"))

    with pytest.raises(grpc.aio.AioRpcError) as twice:
        await rest(execute(stub, shell(["true"]), task_id="once"))

    assert twice.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert node.slots.free == 2


async def test_secrets_reach_the_task_and_are_masked_in_what_it_streams(
    make_node: MakeNode,
) -> None:
    node = await make_node(secrets={"api-key": "hunter2"})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{node.port}") as channel:
        stub = node_pb2_grpc.NodeStub(channel)
        spec = shell('echo "key=$API_KEY"')
        spec.secrets.add(name="api-key", env="API_KEY")

        updates = await rest(execute(stub, spec))

    streamed = "".join(u.output.data for u in updates if u.HasField("output"))
    assert streamed == "key=***\n"
    assert updates[-1].finished.result.stdout == "key=***\n"


async def test_a_timeout_ends_a_direct_task_as_timed_out(stub: node_pb2_grpc.NodeStub) -> None:
    updates = await rest(execute(stub, shell(["sleep", "30"], timeout=timedelta(seconds=0.3))))

    assert updates[-1].finished.state == task_pb2.TASK_STATE_TIMED_OUT


# -- who may call it -----------------------------------------------------------------------


async def test_calls_without_the_nodes_token_are_unauthenticated(
    stub: node_pb2_grpc.NodeStub, channel: grpc.aio.Channel
) -> None:
    for metadata in ((), (("authorization", "Bearer wrong"),)):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await rest(
                stub.Execute(
                    node_pb2.ExecuteRequest(spec=shell(["true"])), metadata=metadata, timeout=5
                )
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await status_of(channel) == SERVING  # health stays open to probes


async def test_with_auth_off_on_loopback_anyone_may_call(make_node: MakeNode) -> None:
    node = await make_node(auth=False, token="")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{node.port}") as channel:
        stub = node_pb2_grpc.NodeStub(channel)
        updates = [
            u async for u in stub.Execute(node_pb2.ExecuteRequest(spec=shell(["echo", "hi"])))
        ]
    assert updates[-1].finished.result.stdout == "hi\n"


async def test_auth_off_beyond_loopback_refuses_to_start(make_node: MakeNode) -> None:
    with pytest.raises(FailedPrecondition, match="auth off"):
        await make_node(auth=False, listen="0.0.0.0:0")


async def test_a_standalone_node_without_a_token_refuses_to_start(
    make_node: MakeNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "empty"))  # no local admin token either
    with pytest.raises(FailedPrecondition, match="needs a token"):
        await make_node(token="", token_file=None)


# -- health --------------------------------------------------------------------------------


async def test_health_of_every_name_follows_draining(
    node: NodeAgent, stub: node_pb2_grpc.NodeStub, channel: grpc.aio.Channel
) -> None:
    names = ["", NODE_SERVICE, *(executor_health_name(e) for e in node.executors)]
    assert executor_health_name("shell") in names
    for name in names:
        assert await status_of(channel, name) == SERVING

    node.drain(5.0)

    async def all_not_serving() -> None:
        for name in names:
            assert await status_of(channel, name) == NOT_SERVING, name

    await eventually(all_not_serving)
    with pytest.raises(grpc.aio.AioRpcError) as draining:
        await rest(execute(stub, shell(["true"])))
    assert draining.value.code() == grpc.StatusCode.UNAVAILABLE

    node.undrain()

    async def all_serving() -> None:
        for name in names:
            assert await status_of(channel, name) == SERVING, name

    await eventually(all_serving)
    assert (await rest(execute(stub, shell(["true"]))))[-1].finished.state == (
        task_pb2.TASK_STATE_SUCCEEDED
    )


class StubLoad:
    """A machine whose foreground load the test sets."""

    def __init__(self) -> None:
        self.cpu = 0.0

    def sample(self, task_sessions: object) -> Load:
        return Load(cpu_percent=self.cpu, memory_percent=1.0)


async def test_a_throttled_node_is_not_serving_and_takes_urgent_work_only(
    make_node: MakeNode,
) -> None:
    node = await make_node(
        guard=True,
        guard_busy_after=timedelta(0),
        guard_calm_after=timedelta(0),
        guard_min_priority="high",
    )
    assert node.guard is not None
    load = StubLoad()
    node.guard.source = load
    async with grpc.aio.insecure_channel(f"127.0.0.1:{node.port}") as channel:
        stub = node_pb2_grpc.NodeStub(channel)
        load.cpu = 99.0

        async def not_serving() -> None:
            assert await status_of(channel) == NOT_SERVING
            assert await status_of(channel, executor_health_name("shell")) == NOT_SERVING

        await eventually(not_serving)
        with pytest.raises(grpc.aio.AioRpcError) as busy:
            await rest(execute(stub, shell(["true"])))
        assert busy.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "busy" in str(busy.value.details())
        urgent = await rest(execute(stub, shell(["true"], priority="high")))
        assert urgent[-1].finished.state == task_pb2.TASK_STATE_SUCCEEDED

        load.cpu = 0.0

        async def serving() -> None:
            assert await status_of(channel) == SERVING

        await eventually(serving)


# -- the parts -----------------------------------------------------------------------------


async def test_slots_are_first_come_first_served_and_a_cancelled_waiter_passes_its_turn() -> None:
    slots = Slots(1)
    assert slots.try_take() and not slots.try_take()
    order: list[str] = []

    async def waiter(name: str) -> None:
        await slots.take()
        order.append(name)

    first = asyncio.create_task(waiter("first"))
    second = asyncio.create_task(waiter("second"))
    await asyncio.sleep(0)  # both queue up
    assert slots.free == 0
    first.cancel()
    slots.give()
    with contextlib.suppress(asyncio.CancelledError):
        await first
    await second
    assert order == ["second"] and slots.held == 1
    slots.give()
    assert slots.free == 1 and slots.held == 0


def test_finished_direct_tasks_are_kept_for_a_while_and_a_bounded_number() -> None:
    now = [0.0]
    tasks = DirectTasks(keep=2, keep_for=timedelta(minutes=1), clock=lambda: now[0])
    done = Outcome(task_pb2.TASK_STATE_SUCCEEDED, task_pb2.TaskResult())
    running = tasks.new("running")
    for name in ("a", "b", "c"):
        tasks.new(name).finished(done)

    with pytest.raises(AlreadyExists):
        tasks.new("b")
    assert tasks.get("b").state == task_pb2.TASK_STATE_SUCCEEDED
    assert len(tasks) == 3  # "a", the oldest finished, went; the running one stays
    now[0] = 61.0
    assert len(tasks) == 3  # forgotten when the registry is next used
    assert tasks.get("running") is running
    assert len(tasks) == 1
