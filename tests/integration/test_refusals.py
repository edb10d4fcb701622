"""A node its coordinator refuses for good stops, saying why and what to change; one that only
cannot reach it, or that found a coordinator which cannot prove itself, keeps dialling."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from shoal import AsyncClient
from shoal.config import CoordinatorSettings, NodeSettings
from shoal.coordinator.server import CoordinatorServer
from shoal.errors import PermissionDenied
from shoal.node.agent import NodeAgent
from shoal.v1 import admin_pb2

from .harness import STARTUP, CliProcess, CliProcesses, eventually, free_port

pytestmark = pytest.mark.timeout(60)


async def node_token(
    address: str, token_file: Path, admin: str | None = None, **request: object
) -> str:
    """A node token made by the coordinator's admin, written to `token_file`."""
    async with AsyncClient(address, token=admin) as client:
        made = await client.create_token(
            admin_pb2.CreateTokenRequest(role=admin_pb2.ROLE_NODE, **request)  # type: ignore[arg-type]
        )
    await asyncio.to_thread(token_file.write_text, made.token + "\n")
    return made.token


async def ends(node: CliProcess) -> tuple[int, str]:
    """The exit status of a node process and its last line on stderr."""
    _, err = await asyncio.wait_for(node.proc.communicate(), STARTUP)
    lines = err.decode().splitlines()
    assert "Traceback" not in err.decode(), err.decode()
    return node.proc.returncode or 0, lines[-1]


async def test_a_node_offering_executors_its_token_does_not_allow_stops(
    cli: CliProcesses, tmp_path: Path
) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    await cli.coordinator(port, tmp_path / "data")
    token_file = tmp_path / "n1.token"
    await node_token(address, token_file, name="n1", node_id="n1", executors=["shell"])

    node = await cli.start(
        "node", "-c", address, "--node-id", "n1", "--token-file", str(token_file), pipe=True
    )
    status, line = await ends(node)
    assert status == 1
    assert line.startswith(f"error: the coordinator at {address} refused this node: token 'n1'")
    assert "may not offer executors" in line and "--executor" in line

    # With only what its token allows, the same node joins.
    joined = await cli.start(
        "node", "-c", address, "--node-id", "n1", "--token-file", str(token_file),
        "--executor", "shell",
    )  # fmt: skip
    async with AsyncClient(address) as client:

        async def connected() -> None:
            nodes = await client.nodes()
            assert [(n.info.node_id, list(n.info.executors)) for n in nodes] == [("n1", ["shell"])]

        await eventually(connected, timeout=STARTUP)
    assert joined.running


async def test_a_node_with_a_revoked_token_stops(cli: CliProcesses, tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    await cli.coordinator(port, tmp_path / "data")
    token_file = tmp_path / "n1.token"
    await node_token(address, token_file, name="n1", node_id="n1")
    async with AsyncClient(address) as client:
        await client.revoke_token("n1")

    node = await cli.start(
        "node", "-c", address, "--node-id", "n1", "--token-file", str(token_file), pipe=True
    )
    status, line = await ends(node)
    assert status == 1
    assert line.startswith(f"error: the coordinator at {address} refused this node: token 'n1'")
    assert "was revoked" in line and "shoal token create" in line


async def test_a_found_coordinator_is_heard_only_once_it_proved_itself(
    tmp_path: Path,
) -> None:
    """A node that finds its coordinator by itself (as by mDNS) takes no refusal from one that
    cannot prove it issued the node's token (another cluster's, an impostor): it keeps looking.
    Its own coordinator, once proven, refuses it for good."""
    for name in ("ours", "theirs"):
        (tmp_path / name).mkdir()
    ours, theirs = (
        CoordinatorServer(
            CoordinatorSettings(listen="127.0.0.1:0", data_dir=tmp_path / name, advertise="off")
        )
        for name in ("ours", "theirs")
    )
    node: NodeAgent | None = None
    await ours.start()
    try:
        await theirs.start()
        admin = (await asyncio.to_thread(ours.admin_token_path.read_text)).strip()
        token = await node_token(
            ours.address, tmp_path / "n1.token", admin, name="n1", node_id="n1",
            executors=["shell"],
        )  # fmt: skip
        node = NodeAgent(NodeSettings(node_id="n1", token=token, advertise="off"))
        found = theirs.address
        tried: list[str] = []

        async def coordinator() -> str:
            tried.append(found)
            return found

        node.discovery.async_coordinator = coordinator  # type: ignore[method-assign]
        await node.start()
        await eventually(lambda: tried.count(theirs.address) >= 3)
        assert node.refusal is None and not node.left.is_set()

        found = ours.address  # proven, it refuses the executors its token does not allow
        await asyncio.wait_for(node.left.wait(), STARTUP)
        assert isinstance(node.refusal, PermissionDenied)
        assert "may not offer executors" in node.refusal.message
    finally:
        if node is not None:
            await node.stop()
        await theirs.stop()
        await ours.stop()
