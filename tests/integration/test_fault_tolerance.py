"""Drain, self-fencing and breakers with a real coordinator and real nodes, in this process."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shoal import shell
from shoal.v1 import task_pb2

from .harness import BIN, MeshFactory, eventually, run_tool

pytestmark = pytest.mark.timeout(60)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def node_health(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        return int(reply.status)


async def test_drain_and_undrain_from_the_cli(
    mesh_factory: MeshFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    mesh = await mesh_factory(slots=2)
    node_id = mesh.node.node_id
    monkeypatch.setenv("SHOAL_TOKEN", mesh.token)
    monkeypatch.setenv("SHOAL_COORDINATOR", mesh.address)
    shoal = str(BIN / "shoal")
    assert await node_health(mesh.node_address) == SERVING

    drained = await run_tool([shoal, "drain", node_id, "--grace", "5"])
    assert drained.returncode == 0, drained.stderr
    assert f"node {node_id} draining" in drained.stdout

    async def not_serving() -> None:
        assert await node_health(mesh.node_address) == NOT_SERVING

    await eventually(not_serving)
    task = await mesh.client.submit(shell(["true"]))
    waiting = await mesh.client.get(task.id)
    assert waiting.state == task_pb2.TASK_STATE_QUEUED
    assert waiting.pending_reason == f"the only fitting node ({node_id}) is draining"
    listed = await run_tool([shoal, "nodes"])
    assert "draining" in listed.stdout

    undrained = await run_tool([shoal, "undrain", node_id])
    assert undrained.returncode == 0, undrained.stderr
    done = await mesh.client.wait(task.id, timeout=timedelta(seconds=20))
    assert done.state == task_pb2.TASK_STATE_SUCCEEDED
    assert await node_health(mesh.node_address) == SERVING


async def test_a_node_cut_off_from_its_coordinator_stops_its_tasks_before_its_lease_ends(
    mesh_factory: MeshFactory, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger.jsonl"
    lease = {"lease": timedelta(seconds=1.5), "heartbeat_interval": timedelta(seconds=0.25)}
    mesh = await mesh_factory(coordinator=lease, ledger=ledger)
    task = await mesh.client.submit(shell(["sleep", "60"]))

    async def started() -> None:
        assert mesh.node.running == 1
        assert (await mesh.client.get(task.id)).state == task_pb2.TASK_STATE_RUNNING

    await eventually(started)
    await mesh.coordinator.stop()  # gone, and it does not come back

    async def fenced() -> None:
        assert mesh.node.running == 0

    await eventually(fenced, timeout=5.0)
    lines = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert [(x["event"], x["task"]) for x in lines] == [("start", task.id), ("finish", task.id)]
    stopped = lines[-1]
    assert stopped["fenced"] and stopped["state"] == "CANCELLED"
    # Within the lease (1.5 s, less its margin) of the start, give or take a heartbeat.
    assert stopped["t"] - lines[0]["t"] < 3.0


async def test_nodes_follow_the_pace_the_coordinator_slows_as_the_cluster_grows(
    mesh_factory: MeshFactory,
) -> None:
    pace = {
        "heartbeat_interval": timedelta(seconds=0.25),
        "lease": timedelta(seconds=1.5),
        "max_heartbeat_rate": 6.0,  # one node heartbeats 4 times a second, two would be 8
    }
    mesh = await mesh_factory(coordinator=pace)
    assert mesh.node.link.interval == 0.25
    second = await mesh.start_node(node_id="second", labels={"name": "second"})

    # The first node is told with its next lease renewal: every second, a 6 s lease.
    await eventually(lambda: mesh.node.link.interval == 1.0)
    assert second.link.interval == 1.0

    async def joined_at() -> float:
        (status,) = [n for n in await mesh.client.nodes() if n.info.node_id == "second"]
        return status.connected_at.ToMicroseconds()

    before = await joined_at()
    spec = shell(["sleep", "3"])
    spec.required_labels["name"] = "second"
    task = await mesh.client.submit(spec)
    done = await mesh.client.wait(task.id, timeout=timedelta(seconds=20))
    assert done.state == task_pb2.TASK_STATE_SUCCEEDED  # two of the first leases: not fenced
    assert await joined_at() == before  # the same session throughout
