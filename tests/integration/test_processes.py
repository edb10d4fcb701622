"""Real OS processes started through the CLI: `shoal coordinator`, `shoal node`, `shoal run`."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shoal import AsyncClient, Client, Unavailable, python, shell
from shoal.v1 import task_pb2

from .harness import STARTUP, CliProcess, CliProcesses, eventually, free_port, gate_script

pytestmark = pytest.mark.timeout(60)

WAIT = timedelta(seconds=20)
WAIT_MANY = timedelta(seconds=45)  # a deadline, not a duration: on time it takes ~3 s


async def connected_nodes(client: AsyncClient, node_ids: set[str]) -> None:
    """Return once exactly `node_ids` hold a session with the coordinator."""

    async def check() -> None:
        assert {n.info.node_id for n in await client.nodes()} == node_ids

    await eventually(check, timeout=STARTUP, interval=0.05, retry_on=(AssertionError, Unavailable))


async def wait_all(
    client: AsyncClient, ids: Sequence[str], logs: CliProcesses, *, timeout: timedelta = WAIT
) -> list[task_pb2.Task]:
    """Every task once final; fails, with the processes' logs, unless all succeeded."""
    tasks = await asyncio.gather(*(client.wait(i, timeout=timeout) for i in ids))
    unfinished = [t for t in tasks if t.state != task_pb2.TASK_STATE_SUCCEEDED]
    assert not unfinished, f"{len(unfinished)} not succeeded, e.g. {unfinished[0]}\n{logs.logs()}"
    return tasks


def gated(gate: Path, i: int) -> task_pb2.TaskSpec:
    """A task that waits for `gate` to exist, then prints its index."""
    return shell(gate_script(gate, f"echo task-{i}"), name=f"gated-{i}")


async def test_thousand_tasks_in_one_batch_across_two_node_processes(
    cli: CliProcesses, tmp_path: Path
) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    await cli.coordinator(port, tmp_path / "data")
    await cli.node(address, node_id="node-a", slots=8)
    await cli.node(address, node_id="node-b", slots=8)
    specs = [
        python(f"print({i} * 3)") if i % 100 == 0 else shell(["echo", f"task-{i}"])
        for i in range(1000)
    ]

    async with AsyncClient(address) as client:
        await connected_nodes(client, {"node-a", "node-b"})
        started = time.monotonic()
        ids = await client.submit_batch(specs)
        tasks = await wait_all(client, ids, cli, timeout=WAIT_MANY)
        elapsed = time.monotonic() - started

    assert len(set(ids)) == 1000
    for i, task in enumerate(tasks):
        expected = f"{i * 3}\n" if i % 100 == 0 else f"task-{i}\n"
        assert task.id == ids[i]
        assert task.result.stdout == expected, (i, task)
        assert task.result.exit_code == 0
    per_node = Counter(t.node_id for t in tasks)
    assert set(per_node) == {"node-a", "node-b"}, per_node
    assert min(per_node.values()) > 0
    print(f"1000 tasks in {elapsed:.2f} s, per node {dict(per_node)}")


async def test_tasks_accepted_without_nodes_survive_a_coordinator_kill(
    cli: CliProcesses, tmp_path: Path
) -> None:
    port = free_port()
    address, data_dir = f"127.0.0.1:{port}", tmp_path / "data"
    coordinator = await cli.coordinator(port, data_dir)
    async with AsyncClient(address) as client:
        # (They wait for a node, however long: else they fail once their grace is over.)
        ids = [
            (await client.submit(shell(["echo", f"single-{i}"], wait_for_node=True))).id
            for i in range(10)
        ]
        ids += await client.submit_batch(
            [shell(["echo", f"batch-{i}"], wait_for_node=True) for i in range(10)]
        )
        for task_id in ids:
            task = await client.get(task_id)
            assert task.state == task_pb2.TASK_STATE_QUEUED
            assert "shell" in task.pending_reason

    assert await coordinator.kill() == -9
    await cli.coordinator(port, data_dir)  # same port, same data dir
    await cli.node(address, node_id="node-a", slots=4)

    async with AsyncClient(address) as client:
        tasks = await wait_all(client, ids, cli)
        listed = await client.list(limit=1000)

    expected = [f"single-{i}\n" for i in range(10)] + [f"batch-{i}\n" for i in range(10)]
    assert [t.result.stdout for t in tasks] == expected
    assert {t.node_id for t in tasks} == {"node-a"}
    assert sorted(t.id for t in listed) == sorted(ids)  # nothing lost, nothing doubled


async def test_connected_node_reconnects_and_keeps_its_tasks_after_a_coordinator_kill(
    cli: CliProcesses, tmp_path: Path
) -> None:
    port = free_port()
    address, data_dir, gate = f"127.0.0.1:{port}", tmp_path / "data", tmp_path / "gate"
    coordinator = await cli.coordinator(port, data_dir)
    node = await cli.node(address, node_id="node-a", slots=4)
    async with AsyncClient(address) as client:
        await connected_nodes(client, {"node-a"})
        ids = await client.submit_batch([gated(gate, i) for i in range(20)])
        first_epoch = await in_flight(client, 4)
    # Only attempts the coordinator recorded (about once a second) are kept across a crash.
    await eventually(lambda: recorded_attempts(data_dir, "node-a", 4), timeout=STARTUP)

    assert await coordinator.kill() == -9
    await cli.coordinator(port, data_dir)

    async with AsyncClient(address) as client:
        await connected_nodes(client, {"node-a"})  # the node came back by itself
        gate.touch()
        tasks = await wait_all(client, ids, cli)

    assert [t.result.stdout for t in tasks] == [f"task-{i}\n" for i in range(20)]
    assert {t.node_id for t in tasks} == {"node-a"}
    # The four it was running when the coordinator died it kept running: their attempts
    # are still the first epoch's; the rest were dispatched after the restart.
    epochs = Counter(t.attempt.epoch for t in tasks)
    assert epochs == {first_epoch: 4, first_epoch + 1: 16}, epochs
    assert node.running, f"the node process exited:\n{node.output()}"


def recorded_attempts(data_dir: Path, node_id: str, count: int) -> None:
    """The store holds `count` attempts of `node_id` (read beside the running coordinator)."""
    with contextlib.closing(sqlite3.connect(data_dir / "shoal.db")) as db:
        row = db.execute("SELECT attempts FROM node_attempts WHERE node_id = ?", (node_id,))
        (attempts,) = row.fetchone() or ("",)
    assert len(attempts.splitlines()) == count


async def in_flight(client: AsyncClient, count: int) -> int:
    """Wait until `count` tasks run; returns the coordinator epoch of their attempts."""

    async def check() -> int:
        running = await client.list(states=[task_pb2.TASK_STATE_RUNNING])
        assert len(running) == count
        return running[0].attempt.epoch

    return await eventually(check, timeout=STARTUP)


async def queued(client: AsyncClient, task_id: str) -> None:
    task = await client.get(task_id)
    assert task.state == task_pb2.TASK_STATE_QUEUED, task_pb2.TaskState.Name(task.state)


async def cluster(cli: CliProcesses, tmp_path: Path) -> str:
    """A coordinator process and a connected node process; returns the coordinator address."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    await cli.coordinator(port, tmp_path / "data")
    await cli.node(address, node_id="node-a", slots=2)
    async with AsyncClient(address) as client:
        await connected_nodes(client, {"node-a"})
    return address


async def communicate(run: CliProcess, timeout: float = 30.0) -> tuple[str, str]:
    out, err = await asyncio.wait_for(run.proc.communicate(), timeout)
    return out.decode(), err.decode()


async def test_shoal_run_passes_output_and_exit_status(cli: CliProcesses, tmp_path: Path) -> None:
    address = await cluster(cli, tmp_path)

    run = await cli.start(
        "run", "-c", address, "--", "sh", "-c", "echo out; echo err >&2; exit 3", pipe=True
    )
    stdout, stderr = await communicate(run)

    assert run.proc.returncode == 3, (stdout, stderr)
    assert "out" in stdout
    assert "err" not in stdout
    assert "err" in stderr


async def test_shoal_run_streams_output_live(cli: CliProcesses, tmp_path: Path) -> None:
    address = await cluster(cli, tmp_path)

    run = await cli.start(
        "run", "-c", address, "--", "sh", "-c", "echo first; sleep 2; echo second", pipe=True
    )
    assert run.proc.stdout is not None
    first = await asyncio.wait_for(run.proc.stdout.readline(), 20)
    first_at = time.monotonic()
    still_running = run.running
    second = await asyncio.wait_for(run.proc.stdout.readline(), 20)
    second_at = time.monotonic()
    rest, stderr = await communicate(run)

    assert first == b"first\n", stderr
    assert still_running, "the first line only arrived once `shoal run` had exited"
    assert second == b"second\n"
    # The task sleeps 2 s between its lines: had the output been held back, both would
    # have arrived together.
    assert second_at - first_at > 1.0, "the first line was not streamed live"
    assert rest == ""
    assert run.proc.returncode == 0, stderr


async def test_coordinator_health_over_a_real_channel(cli: CliProcesses, tmp_path: Path) -> None:
    """The process answers health checks for each of its services by name."""
    port = free_port()
    await cli.coordinator(port, tmp_path / "data")

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        statuses = [
            (await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)).status
            for name in ("", "shoal.v1.Tasks", "shoal.v1.Admin", "shoal.v1.NodeGateway")
        ]

    assert statuses == [health_pb2.HealthCheckResponse.SERVING] * 4


async def test_ctrl_c_on_shoal_run_cancels_the_task(cli: CliProcesses, tmp_path: Path) -> None:
    address = await cluster(cli, tmp_path)
    run = await cli.start(
        "run", "-c", address, "--", "sh", "-c", "echo started; sleep 30", pipe=True
    )
    assert run.proc.stdout is not None
    assert await asyncio.wait_for(run.proc.stdout.readline(), 20) == b"started\n"

    run.proc.send_signal(signal.SIGINT)
    _, stderr = await communicate(run)

    assert run.proc.returncode != 0
    async with AsyncClient(address) as client:
        (task,) = await client.list()
        assert task.id in stderr  # `shoal run` names its task on stderr
        done = await client.wait(task.id, timeout=WAIT)
    assert done.state == task_pb2.TASK_STATE_CANCELLED


async def test_a_stopped_node_hands_its_running_task_back(
    cli: CliProcesses, tmp_path: Path
) -> None:
    port = free_port()
    address, gate = f"127.0.0.1:{port}", tmp_path / "gate"
    await cli.coordinator(port, tmp_path / "data")
    leaving = await cli.start(
        "node", "-c", address, "--node-id", "node-a", "--drain-grace", "1", name="node-a"
    )
    async with AsyncClient(address) as client:
        await connected_nodes(client, {"node-a"})
        task = await client.submit(gated(gate, 0))
        await in_flight(client, 1)

        # SIGTERM: it drains; the task does not end within the grace, so it is given back.
        assert await leaving.stop() == 0
        assert "giving back 1 tasks" in leaving.output()
        await eventually(lambda: queued(client, task.id))  # handed back, not lost with the node
        await cli.node(address, node_id="node-b", slots=2)
        await connected_nodes(client, {"node-b"})
        gate.touch()
        done = await client.wait(task.id, timeout=WAIT)

    assert done.state == task_pb2.TASK_STATE_SUCCEEDED, done
    assert done.node_id == "node-b"
    assert done.attempt.number == 2
    assert done.result.stdout == "task-0\n"


def _blocking_quickstart(address: str) -> tuple[str, list[str], list[str]]:
    """The README's Client quickstart, as a user runs it (no event loop of their own)."""
    with Client(address) as client:
        task = client.submit(shell(["echo", "hello"]))
        hello = client.wait(task.id, timeout=WAIT).result.stdout
        ids = client.submit_batch(python(f"print({i} ** 2)") for i in range(5))
        squares = [client.wait(i, timeout=WAIT).result.stdout for i in ids]
        output = [
            e.output.data for e in client.run(shell("echo 1; echo 2")) if e.HasField("output")
        ]
    return hello, squares, output


async def test_blocking_client_quickstart(cli: CliProcesses, tmp_path: Path) -> None:
    address = await cluster(cli, tmp_path)

    hello, squares, output = await asyncio.to_thread(_blocking_quickstart, address)

    assert hello == "hello\n"
    assert squares == [f"{i**2}\n" for i in range(5)]
    assert "".join(output) == "1\n2\n"


async def test_shoal_submit_count_wait(cli: CliProcesses, tmp_path: Path) -> None:
    address = await cluster(cli, tmp_path)

    submit = await cli.start(
        "submit", "-c", address, "--count", "50", "--wait", "--", "echo", "hi", pipe=True
    )
    stdout, stderr = await communicate(submit)

    assert submit.proc.returncode == 0, stderr
    assert "50 SUCCEEDED" in stdout
    async with AsyncClient(address) as client:
        tasks = await client.list(limit=1000)
    assert len(tasks) == 50
    assert {t.result.stdout for t in tasks} == {"hi\n"}
