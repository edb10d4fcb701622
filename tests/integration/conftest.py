"""Integration fixtures: real servers on loopback port 0, real channels, real processes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from shoal import AsyncClient
from shoal.config import ADMIN_TOKEN_FILE, CoordinatorSettings, NodeSettings
from shoal.coordinator.server import CoordinatorServer
from shoal.node.agent import NodeAgent

from .harness import BIN, STARTUP, CliProcesses, Mesh, MeshFactory


@pytest.fixture
async def mesh_factory(tmp_path: Path) -> AsyncIterator[MeshFactory]:
    """Makes connected in-process meshes (`await make(slots=1)`); teardown shuts all down."""
    async with contextlib.AsyncExitStack() as stack:
        made = 0

        async def make(
            *, slots: int = 4, coordinator: dict[str, Any] | None = None, **node_settings: Any
        ) -> Mesh:
            """A coordinator (with `coordinator` settings) and one node (`node_settings`)."""
            nonlocal made
            data_dir = tmp_path / f"mesh-{made}"
            made += 1
            data_dir.mkdir()
            server = CoordinatorServer(
                CoordinatorSettings(listen="127.0.0.1:0", data_dir=data_dir, **(coordinator or {}))
            )
            await server.start()
            stack.push_async_callback(_bounded, server.stop)
            token_file = server.admin_token_path

            async def start_node(**settings: Any) -> NodeAgent:
                node = NodeAgent(
                    NodeSettings(
                        **{
                            "coordinator": server.address,
                            "listen": "127.0.0.1:0",
                            "token_file": token_file,
                            **settings,
                        }
                    )
                )
                await node.start()
                stack.push_async_callback(_bounded, node.stop)
                await asyncio.wait_for(node.connected.wait(), STARTUP)
                return node

            node = await start_node(slots=slots, **node_settings)
            token = token_file.read_text().strip()
            client = AsyncClient(server.address, token=token)
            stack.push_async_callback(_bounded, client.close)
            return Mesh(server, node, client, data_dir, token, start_node)

        # Teardown runs in reverse: the client, the node (it hands back its work), the coordinator.
        yield make


async def _bounded(stop: Callable[[], Awaitable[None]]) -> None:
    await asyncio.wait_for(stop(), 20)


@pytest.fixture
async def mesh(mesh_factory: MeshFactory) -> Mesh:
    """An in-process coordinator and a connected 4-slot node on loopback port 0."""
    return await mesh_factory(slots=4)


@pytest.fixture
async def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[CliProcesses]:
    """Starts `shoal` CLI processes; every one is stopped, or killed, in teardown.

    Coordinators keep their data in tmp_path/"data"; clients and nodes, in this process and
    the ones started, find its admin token there.
    """
    token_file = str(tmp_path / "data" / ADMIN_TOKEN_FILE)
    monkeypatch.setenv("SHOAL_TOKEN_FILE", token_file)
    monkeypatch.setenv("SHOAL_NODE_TOKEN_FILE", token_file)
    processes = CliProcesses(tmp_path)
    try:
        yield processes
    finally:
        await processes.aclose()


@pytest.fixture
def grpcurl() -> Path:
    """The real grpcurl of the venv: a missing one fails the test rather than skipping it."""
    path = BIN / "grpcurl"
    assert path.exists(), f"{path} is missing: install the dev extras (make dev)"
    return path
