"""Adopt mode in one process: the coordinator dials nodes (Node.Attach) and runs their sessions.

The LAN version (mDNS, kill -9 and restart of a node process) is in test_discovery.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from shoal import AsyncClient, shell
from shoal.config import CoordinatorSettings, NodeSettings
from shoal.coordinator.server import CoordinatorServer
from shoal.node.agent import NodeAgent
from shoal.v1 import admin_pb2, task_pb2

from .harness import eventually, free_port

pytestmark = pytest.mark.timeout(60)

Start = Callable[..., Awaitable[Any]]


@pytest.fixture
async def started() -> AsyncIterator[Start]:
    """`await start(thing)` starts a coordinator or node; teardown stops them in reverse."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(thing: CoordinatorServer | NodeAgent) -> Any:
            await thing.start()
            stack.push_async_callback(thing.stop)
            return thing

        yield start


def _coordinator(tmp_path: Path, name: str, **settings: Any) -> CoordinatorServer:
    data_dir = tmp_path / name
    data_dir.mkdir()
    return CoordinatorServer(
        CoordinatorSettings(listen="127.0.0.1:0", data_dir=data_dir, advertise="off", **settings)
    )


def _node(port: int, token: str, **settings: Any) -> NodeAgent:
    """A node that dials nobody (standalone), its service on `port`."""
    return NodeAgent(
        NodeSettings(
            **{
                "node_id": "n1",
                "listen": f"127.0.0.1:{port}",
                "standalone": True,
                "token": token,
                "slots": 2,
                "advertise": "off",
                **settings,
            }
        )
    )


async def _node_token(coordinator: CoordinatorServer, node_id: str = "n1") -> str:
    """A node token of `coordinator` for `node_id`: an adopting coordinator proves itself only
    for a node's own token."""
    admin = coordinator.admin_token_path.read_text().strip()
    async with AsyncClient(coordinator.address, token=admin) as client:
        made = await client.create_token(
            admin_pb2.CreateTokenRequest(name=node_id, role=admin_pb2.ROLE_NODE)
        )
    return made.token


async def _node_status(client: AsyncClient, node_id: str) -> admin_pb2.NodeStatus | None:
    return next((n for n in await client.nodes() if n.info.node_id == node_id), None)


async def _runs_a_task(client: AsyncClient) -> task_pb2.Task:
    submitted = await client.submit(shell("echo adopted"))
    task = await asyncio.wait_for(client.wait(submitted.id), 20)
    assert task.state == task_pb2.TASK_STATE_SUCCEEDED, task
    assert (task.node_id, task.result.stdout) == ("n1", "adopted\n")
    return task


async def test_a_coordinator_dials_a_node_runs_tasks_and_redials_after_a_restart(
    tmp_path: Path, started: Start
) -> None:
    port = free_port()
    coordinator = _coordinator(tmp_path, "c", nodes=[f"127.0.0.1:{port}"])
    await started(coordinator)
    token = await _node_token(coordinator)
    node = await started(_node(port, token))
    admin = coordinator.admin_token_path.read_text().strip()
    async with AsyncClient(coordinator.address, token=admin) as client:

        async def adopted() -> None:
            status = await _node_status(client, "n1")
            assert status is not None and status.connected and status.adopted, status

        await eventually(adopted, timeout=15)
        await _runs_a_task(client)

        # The node goes away (its process would be killed) and comes back on its port.
        await node.stop()

        async def gone() -> None:
            assert await _node_status(client, "n1") is None

        await eventually(gone, timeout=15)
        await started(_node(port, token))
        await eventually(adopted, timeout=15)
        await _runs_a_task(client)


async def test_a_node_takes_only_the_coordinator_that_issued_its_token(
    tmp_path: Path, started: Start, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    issuer = await started(_coordinator(tmp_path, "issuer"))
    token = await _node_token(issuer)
    # Another coordinator, with a store of its own, dials the node: it cannot prove itself.
    imposter = await started(_coordinator(tmp_path, "imposter", nodes=[f"127.0.0.1:{port}"]))
    await started(_node(port, token))

    def refused() -> None:
        assert "refused a coordinator" in caplog.text
        assert "cannot attach node" in caplog.text

    await eventually(refused, timeout=15)
    imposter_token = imposter.admin_token_path.read_text().strip()
    async with AsyncClient(imposter.address, token=imposter_token) as client:
        assert await _node_status(client, "n1") is None


async def test_one_session_per_node_whichever_side_dialled(tmp_path: Path, started: Start) -> None:
    port = free_port()
    coordinator = _coordinator(tmp_path, "c", nodes=[f"127.0.0.1:{port}"])
    await started(coordinator)
    token = await _node_token(coordinator)
    # This node dials the coordinator itself too; the coordinator, which cannot tell who is at
    # the address until it says Hello, dials it as well.
    node = await started(_node(port, token, standalone=False, coordinator=coordinator.address))
    admin = coordinator.admin_token_path.read_text().strip()
    async with AsyncClient(coordinator.address, token=admin) as client:

        async def adopted() -> None:
            status = await _node_status(client, "n1")
            assert status is not None and status.connected and status.adopted, status

        # The newer session replaced the node's own, and the node stood down: it does not dial
        # again while it is adopted, so the session stays.
        await eventually(adopted, timeout=15)
        first = await _node_status(client, "n1")
        assert first is not None
        for _ in range(3):
            await _runs_a_task(client)
        now = await _node_status(client, "n1")
        assert now is not None and now.adopted and now.connected_at == first.connected_at
        assert not node.link.not_adopted.is_set()
        assert [n.info.node_id for n in await client.nodes()] == ["n1"]
