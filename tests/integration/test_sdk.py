"""The SDK as a program meets it: timeouts, unreachable addresses, states, builders."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from shoal import (
    AsyncClient,
    Client,
    TaskState,
    Unavailable,
    WaitTimeout,
    custom,
    shell,
)
from shoal._status import to_status
from shoal.v1 import task_pb2, tasks_pb2, tasks_pb2_grpc

from .harness import CliProcesses, Mesh, free_port

pytestmark = pytest.mark.timeout(90)

WAIT = timedelta(seconds=20)
DEADLINE = 30.0  # seconds: far beyond the few an unreached coordinator may take to be named


def later() -> datetime:
    return datetime.now(UTC) + timedelta(hours=1)


async def test_wait_with_a_timeout_raises_for_a_task_that_has_not_ended(mesh: Mesh) -> None:
    task = await mesh.client.submit(shell(["true"], not_before=later()))
    short = timedelta(milliseconds=200)

    with pytest.raises(WaitTimeout) as waited:
        await mesh.client.wait(task.id, timeout=short)
    assert waited.value.task.id == task.id
    assert waited.value.task.state == task_pb2.TASK_STATE_PENDING
    assert waited.value.message.startswith(f"task {task.id} still PENDING after 0.2 s")

    def blocking() -> WaitTimeout:
        with Client(mesh.address, token=mesh.token) as client, pytest.raises(WaitTimeout) as err:
            client.wait(task.id, timeout=0.2)  # seconds, as concurrent.futures takes them
        return err.value

    assert (await asyncio.to_thread(blocking)).task.state == task_pb2.TASK_STATE_PENDING
    for bad in (-1, math.nan, "5", True):
        with pytest.raises((ValueError, TypeError), match="timeout must be"):
            await mesh.client.wait(task.id, timeout=bad)  # type: ignore[arg-type]
    # Without a timeout, or once it has ended, the task itself.
    await mesh.client.cancel(task.id)
    ended = await mesh.client.wait(task.id, timeout=short)
    assert ended.state == task_pb2.TASK_STATE_CANCELLED


async def test_execute_submits_and_answers_once_the_task_has_ended(mesh: Mesh) -> None:
    done = await mesh.client.execute(shell(["sh", "-c", "echo out"]))
    assert done.state == task_pb2.TASK_STATE_SUCCEEDED
    assert done.result.stdout == "out\n"
    assert (await mesh.client.get(done.id)).state == task_pb2.TASK_STATE_SUCCEEDED

    def blocking() -> task_pb2.Task:
        with Client(mesh.address, token=mesh.token) as client:
            return client.execute(shell(["false"]))

    failed = await asyncio.to_thread(blocking)
    assert failed.state == task_pb2.TASK_STATE_FAILED
    assert failed.result.exit_code == 1


async def test_execute_with_a_timeout_leaves_the_task_submitted(mesh: Mesh) -> None:
    short = timedelta(milliseconds=200)
    with pytest.raises(WaitTimeout) as waited:
        await mesh.client.execute(shell(["true"], not_before=later()), timeout=short)
    task = waited.value.task
    assert task.state == task_pb2.TASK_STATE_PENDING
    assert (await mesh.client.get(task.id)).state == task_pb2.TASK_STATE_PENDING
    await mesh.client.cancel(task.id)


async def test_a_resent_submit_that_waits_waits_for_the_first_task(mesh: Mesh) -> None:
    """The same request_id: one task, and each call answers with it once it has ended."""
    auth = (("authorization", f"Bearer {mesh.token}"),)
    request = tasks_pb2.SubmitRequest(spec=shell(["true"]), request_id="once", wait=True)
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        stub = tasks_pb2_grpc.TasksStub(channel)
        first, second = await asyncio.gather(
            stub.Submit(request, metadata=auth), stub.Submit(request, metadata=auth)
        )
    assert first.task.id == second.task.id
    assert {first.created, second.created} == {True, False}
    assert first.task.state == second.task.state == task_pb2.TASK_STATE_SUCCEEDED


@pytest.mark.parametrize(
    ("wait", "seconds", "error"),
    [
        (False, 1, "wait_timeout is the bound of a wait: set wait too"),
        (True, -1, "wait_timeout must be between 0 and"),
    ],
)
async def test_a_bad_wait_is_refused_and_stores_nothing(
    mesh: Mesh, wait: bool, seconds: int, error: str
) -> None:
    auth = (("authorization", f"Bearer {mesh.token}"),)
    before = await mesh.client.list()
    request = tasks_pb2.SubmitRequest(spec=shell(["true"]), wait=wait)
    request.wait_timeout.seconds = seconds
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        stub = tasks_pb2_grpc.TasksStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Submit(request, metadata=auth)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.value.details() or "").startswith(error)
    assert len(await mesh.client.list()) == len(before)


async def test_states_read_by_name(mesh: Mesh) -> None:
    """The README's `client.run` loop prints states by name, not number."""
    printed = [
        str(TaskState(e.state))
        async for e in mesh.client.run(shell(["echo", "hi"]))
        if not e.HasField("output")
    ]
    assert printed[-1] == "SUCCEEDED"
    assert set(printed) <= {"QUEUED", "ASSIGNED", "RUNNING", "SUCCEEDED"}, printed


async def test_a_custom_task_runs_on_its_executor(mesh: Mesh) -> None:
    task = await mesh.client.submit(custom("noop", {"hello": "shoal"}))
    done = await mesh.client.wait(task.id, timeout=WAIT)
    assert done.state == task_pb2.TASK_STATE_SUCCEEDED
    assert dict(done.result.output) == {"hello": "shoal"}


@pytest.mark.parametrize(
    "address",
    [f"127.0.0.1:{free_port()}", "no-such-host.invalid:7070"],
    ids=["closed-port", "unresolvable"],  # the same on every xdist worker
)
async def test_a_coordinator_never_reached_is_named_at_once(address: str) -> None:
    """Refused or unresolvable: not worth the minutes `retry_for` rides out a restart for."""
    async with AsyncClient(address, token="t", retry_for=timedelta(minutes=10)) as client:
        with pytest.raises(Unavailable) as unary:
            await asyncio.wait_for(client.list(), DEADLINE)
        with pytest.raises(Unavailable) as watch:
            await asyncio.wait_for(anext(client.watch()), DEADLINE)
    for err in (unary.value, watch.value):
        assert err.message.startswith(f"cannot reach a coordinator at {address}: "), err.message


async def test_a_client_that_reached_its_coordinator_rides_out_a_restart(
    cli: CliProcesses, tmp_path: Path
) -> None:
    port = free_port()
    address, data_dir = f"127.0.0.1:{port}", tmp_path / "data"
    coordinator = await cli.coordinator(port, data_dir)
    # No grace at all for a coordinator never reached: only having reached it keeps it trying.
    async with AsyncClient(
        address, retry_for=timedelta(seconds=60), connect_for=timedelta(0)
    ) as client:
        task = await client.submit(shell(["true"], not_before=later()))
        assert await coordinator.kill() == -9

        call = asyncio.create_task(client.get(task.id))  # fails until the coordinator is back
        await cli.coordinator(port, data_dir)
        assert (await asyncio.wait_for(call, DEADLINE)).id == task.id


async def test_a_wait_longer_than_retry_for_rides_out_a_restart_too(
    cli: CliProcesses, tmp_path: Path
) -> None:
    """`retry_for` counts from when the coordinator went away, not from when the call began:
    a Wait that had waited longer gave up at once (`submit --wait` failed on a restart)."""
    port = free_port()
    address, data_dir = f"127.0.0.1:{port}", tmp_path / "data"
    coordinator = await cli.coordinator(port, data_dir)
    async with AsyncClient(address, retry_for=timedelta(seconds=1)) as client:
        task = await client.submit(shell(["true"], not_before=later()))
        waiting = asyncio.create_task(client.wait(task.id))
        await asyncio.sleep(1.5)  # the Wait has now been in flight longer than retry_for
        assert await coordinator.kill() == -9
        await cli.coordinator(port, data_dir)
        async with AsyncClient(address) as other:
            await other.cancel(task.id)
        done = await asyncio.wait_for(waiting, DEADLINE)
    assert done.state == task_pb2.TASK_STATE_CANCELLED


class StoppingThenBack(tasks_pb2_grpc.TasksServicer):
    """A coordinator that answers UNAVAILABLE, as one that is stopping does, twice."""

    def __init__(self) -> None:
        self.calls = 0

    async def List(
        self, request: tasks_pb2.ListRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tasks_pb2.ListResponse:
        self.calls += 1
        if self.calls <= 2:
            await context.abort_with_status(
                to_status(Unavailable("the coordinator is not accepting tasks"))
            )
        return tasks_pb2.ListResponse()


async def test_a_coordinator_that_answers_unavailable_is_waited_for() -> None:
    """It was reached: it answered, if only that it cannot serve now (it is restarting)."""
    servicer = StoppingThenBack()  # type: ignore[abstract]
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    tasks_pb2_grpc.add_TasksServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with AsyncClient(
            f"127.0.0.1:{port}",
            token="t",
            retry_for=timedelta(seconds=60),
            connect_for=timedelta(0),
        ) as client:
            assert await asyncio.wait_for(client.list(), DEADLINE) == []
        assert servicer.calls == 3
    finally:
        await server.stop(None)
