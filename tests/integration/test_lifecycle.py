"""Both servers serve inside `async with`, and `run()` serves until SIGTERM, then drains."""

from __future__ import annotations

import asyncio
import os
import signal
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from shoal import AsyncClient, shell
from shoal.config import CoordinatorSettings, NodeSettings
from shoal.coordinator.server import CoordinatorServer
from shoal.node.agent import NodeAgent
from shoal.v1 import task_pb2

from .harness import STARTUP, eventually, health_status, wait_serving

pytestmark = pytest.mark.timeout(60)


def _coordinator(tmp_path: Path) -> CoordinatorServer:
    return CoordinatorServer(CoordinatorSettings(listen="127.0.0.1:0", data_dir=tmp_path / "c"))


def _node(server: CoordinatorServer, **settings: Any) -> NodeAgent:
    return NodeAgent(
        NodeSettings(
            coordinator=server.address,
            listen="127.0.0.1:0",
            token_file=server.admin_token_path,
            **settings,
        )
    )


async def _sigterm_once_handled(before: object) -> None:
    """SIGTERM this process once `run()` handles it (the handler `before` may kill the tests)."""

    def handled() -> None:
        assert signal.getsignal(signal.SIGTERM) != before

    await eventually(handled)
    os.kill(os.getpid(), signal.SIGTERM)


async def test_servers_serve_within_async_with_and_are_gone_after(tmp_path: Path) -> None:
    async with _coordinator(tmp_path) as server, _node(server) as node:
        await asyncio.wait_for(node.connected.wait(), STARTUP)
        token = server.admin_token_path.read_text().strip()
        async with AsyncClient(server.address, token=token) as client:
            task = await client.submit(shell("echo hi"))
            done = await client.wait(task.id, timeout=timedelta(seconds=STARTUP))
        assert done.state == task_pb2.TASK_STATE_SUCCEEDED
    for address in (server.address, f"127.0.0.1:{node.port}"):
        with pytest.raises(grpc.RpcError):
            await health_status(address)


async def test_run_serves_until_sigterm(tmp_path: Path) -> None:
    server = _coordinator(tmp_path)
    before = signal.getsignal(signal.SIGTERM)
    running = asyncio.create_task(server.run())

    def listening() -> None:
        assert server.port > 0

    await eventually(listening, timeout=STARTUP)
    await wait_serving(server.address)
    await _sigterm_once_handled(before)
    await asyncio.wait_for(running, 20)
    with pytest.raises(grpc.RpcError):
        await health_status(server.address)
    assert signal.getsignal(signal.SIGTERM) == before  # its handler went with it


async def test_a_node_run_until_sigterm_drains_and_gives_its_task_back(tmp_path: Path) -> None:
    async with _coordinator(tmp_path) as server:
        node = _node(server, slots=1, drain_grace=timedelta(seconds=0.5))
        before = signal.getsignal(signal.SIGTERM)
        running = asyncio.create_task(node.run())
        await asyncio.wait_for(node.connected.wait(), STARTUP)
        token = server.admin_token_path.read_text().strip()
        async with AsyncClient(server.address, token=token) as client:
            task = await client.submit(shell("sleep 60"))

            async def state() -> int:
                return (await client.get(task.id)).state

            async def is_running() -> None:
                assert await state() == task_pb2.TASK_STATE_RUNNING

            async def is_queued() -> None:
                assert await state() == task_pb2.TASK_STATE_QUEUED

            await eventually(is_running, timeout=STARTUP)
            await _sigterm_once_handled(before)
            await asyncio.wait_for(running, 20)
            await eventually(is_queued)  # given back, not lost with the node
