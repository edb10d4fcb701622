"""The chaos harness itself: config files, teardown, the event recorder, the proxy, namespaces."""

from __future__ import annotations

import asyncio
import os
import sys
import tomllib
from pathlib import Path

import grpc
import psutil
import pytest

from shoal import AsyncClient, NotFound, Unavailable, noop, shell
from shoal._server import method_path
from shoal.config import CoordinatorSettings, NodeSettings
from shoal.v1 import task_pb2, tasks_pb2, tasks_pb2_grpc
from tests.chaos.cluster import Cluster, descendants, toml_table
from tests.chaos.harness import wait_nodes, wait_state
from tests.chaos.ledger import final_events
from tests.chaos.netns import NetworkNamespace, netns_unavailable
from tests.chaos.proxy import FaultProxy
from tests.chaos.recorder import EventRecorder, replay
from tests.integration.harness import eventually, process_gone, run_tool

pytestmark = pytest.mark.timeout(60)

SUBMIT = method_path(tasks_pb2.DESCRIPTOR, "Tasks", "Submit")
_NO_NETNS = netns_unavailable()


def test_config_tables_keep_durations_typed(tmp_path: Path) -> None:
    text = toml_table(
        "node",
        {
            "reconnect_max": 0.5,
            "slots": 3,
            "token_file": tmp_path / 'odd "name"',
            "labels": {"pool": "x"},
            "executors": ["shell", "noop"],
            "verbose": True,
        },
    )
    table = tomllib.loads(text)["node"]
    assert table["token_file"] == str(tmp_path / 'odd "name"')
    settings = NodeSettings(**table)
    assert settings.reconnect_max.total_seconds() == 0.5
    assert (settings.slots, settings.labels, settings.executors) == (
        3,
        {"pool": "x"},
        ["shell", "noop"],
    )
    assert (
        CoordinatorSettings(
            **tomllib.loads(toml_table("c", {"lease": 3.5}))["c"]
        ).lease.total_seconds()
        == 3.5
    )


async def test_teardown_ends_a_frozen_node_and_the_tasks_it_runs(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    try:
        await cluster.start_coordinator()
        node = await cluster.start_node("node-a")
        async with cluster.client() as client:
            await wait_nodes(client, ["node-a"])
            task = await client.submit(shell(["sleep", "60"]))
            await wait_state(client, task.id, {task_pb2.TASK_STATE_RUNNING})
        tasks = descendants(node.pid)
        assert tasks, "the task's process is not under the node"
        cluster.freeze("node-a")
    finally:
        await cluster.aclose()

    for pid in [node.pid, *(p.pid for p in tasks)]:
        process_gone(pid)
    assert not cluster.coordinator or not cluster.coordinator.running


async def test_recorder_follows_a_coordinator_across_kill_and_restart(cluster: Cluster) -> None:
    await cluster.start_coordinator()
    await cluster.start_node("node-a", slots=4)
    async with cluster.client() as client, EventRecorder(client) as recorder:
        await wait_nodes(client, ["node-a"])
        before = await client.submit_batch([noop(name=f"before-{i}") for i in range(3)])
        await recorder.wait_final(before, timeout=15)
        await cluster.kill_coordinator()
        await cluster.start_coordinator()
        after = await _submit_when_back(client, 2)
        await recorder.wait_final(after, timeout=15)
        replayed = await replay(client, through=recorder.durable_seq)

    ids = {*before, *after}
    for events in (recorder.events.values(), replayed):
        finals = final_events(events)
        assert {i: len(f) for i, f in finals.items()} == dict.fromkeys(ids, 1)
    assert {e.task_id for e in replayed if e.state == task_pb2.TASK_STATE_QUEUED} == ids
    assert max(e.seq for e in replayed) == recorder.durable_seq
    # Sequence numbers keep growing across the restart (the epoch is in the high bits).
    assert min(e.seq for e in replayed if e.task_id in after) > max(
        e.seq for e in replayed if e.task_id in before
    )


async def _submit_when_back(client: AsyncClient, count: int) -> list[str]:
    async def submit() -> list[str]:
        return await client.submit_batch([noop(name=f"after-{i}") for i in range(count)])

    return await eventually(submit, timeout=15, retry_on=(Unavailable,))


async def test_proxy_loses_the_first_answer_of_each_submit_only(cluster: Cluster) -> None:
    await cluster.start_coordinator()
    token = cluster.token_file.read_text().strip()
    metadata = (("authorization", f"Bearer {token}"),)
    request = tasks_pb2.SubmitRequest(spec=noop({"n": 1}, idempotency_key="proxy-key"))
    async with (
        FaultProxy(cluster.address, drop_first_reply={SUBMIT}) as proxy,
        grpc.aio.insecure_channel(proxy.address) as channel,
        AsyncClient(proxy.address, token=token) as client,
    ):
        # A bare stub, so that no client-side retry hides what the proxy does.
        stub = tasks_pb2_grpc.TasksStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as lost:
            await stub.Submit(request, metadata=metadata, timeout=10)
        retried = await stub.Submit(request, metadata=metadata, timeout=10)
        again = await stub.Submit(request, metadata=metadata, timeout=10)
        other = await client.submit_batch([noop(name="batch")])  # not a faulty method
        with pytest.raises(NotFound):  # upstream errors come through, typed
            await client.get("no-such-task")
        listed = await client.list()
        watched = await asyncio.wait_for(_first_events(client, 2), 10)  # a server stream

    assert lost.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "chaos proxy" in (lost.value.details() or "")
    (exchange,) = proxy.exchanges.values()
    assert exchange.dropped is not None
    first = tasks_pb2.SubmitResponse.FromString(exchange.dropped)
    assert first.created and first.task.id == retried.task.id == again.task.id
    assert not retried.created and not again.created
    assert exchange.tries == 3
    assert sorted(t.id for t in listed) == sorted([first.task.id, *other])
    assert {e.task_id for e in watched} == {first.task.id, *other}


async def _first_events(client: AsyncClient, count: int) -> list[task_pb2.Event]:
    out: list[task_pb2.Event] = []
    events = client.watch(since=0)
    async for event in events:
        out.append(event)
        if len(out) == count:
            break
    await events.aclose()
    return out


@pytest.mark.skipif(bool(_NO_NETNS) and not os.environ.get("CI"), reason=_NO_NETNS or "n/a")
async def test_namespace_partition_heal_and_removal() -> None:
    netns = NetworkNamespace.for_this_process()
    await netns.create()
    try:
        server = await asyncio.start_server(_drop, netns.host_ip, 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            assert await _connects(netns, port), "the namespace cannot reach the root one"
            await netns.partition()
            assert not await _connects(netns, port), "the partition let a connection through"
            await netns.heal()
            assert await _connects(netns, port), "healing did not restore the link"
            # `ip netns exec` execs: the pid we start is the program's own.
            proc = await asyncio.create_subprocess_exec(
                *netns.exec_prefix(), "sleep", "30", stdin=asyncio.subprocess.DEVNULL
            )
            await eventually(lambda: _named(proc.pid, "sleep"))
            proc.kill()
            await proc.wait()
    finally:
        await netns.delete()

    links = await run_tool(["ip", "link", "show", netns.host_if])
    namespaces = await run_tool(["ip", "netns", "list"])
    assert links.returncode != 0
    assert netns.name not in namespaces.stdout
    await netns.delete()  # idempotent


async def _drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def _connects(netns: NetworkNamespace, port: int) -> bool:
    probe = (
        "import socket, sys\n"
        f"try: socket.create_connection(({netns.host_ip!r}, {port}), timeout=1).close()\n"
        "except OSError: sys.exit(1)\n"
    )
    done = await run_tool([*netns.exec_prefix(), sys.executable, "-c", probe], timeout=10)
    return done.returncode == 0


def _named(pid: int, name: str) -> None:
    assert psutil.Process(pid).name() == name
