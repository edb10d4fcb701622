"""A node's token goes only to the coordinator that issued it, and a relay cannot pass on the
proof: an attacker that gets a coordinator to dial it (adopt mode) or that a node finds first
(mDNS) forwards the challenge to the real coordinator, and the proof names the wrong address.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from shoal import AsyncClient, certs, shell
from shoal._channel import open_channel
from shoal._health import Health, check_health
from shoal.config import CoordinatorSettings, NodeSettings
from shoal.coordinator.server import CoordinatorServer
from shoal.errors import PermissionDenied, Unauthenticated
from shoal.handshake import Direction
from shoal.node.agent import NodeAgent
from shoal.v1 import admin_pb2, gateway_pb2_grpc, node_pb2, node_pb2_grpc, task_pb2

from .harness import eventually, free_port

pytestmark = pytest.mark.timeout(60)

Start = Callable[..., Awaitable[Any]]


@pytest.fixture
async def started() -> AsyncIterator[Start]:
    async with contextlib.AsyncExitStack() as stack:

        async def start(thing: Any) -> Any:
            await thing.start()
            stack.push_async_callback(thing.stop)
            return thing

        yield start


def _coordinator(tmp_path: Path, **settings: Any) -> CoordinatorServer:
    data_dir = tmp_path / "coordinator"
    data_dir.mkdir()
    return CoordinatorServer(
        CoordinatorSettings(listen="127.0.0.1:0", data_dir=data_dir, advertise="off", **settings)
    )


async def _token(coordinator: CoordinatorServer, node_id: str) -> str:
    admin = coordinator.admin_token_path.read_text().strip()
    async with AsyncClient(coordinator.address, token=admin) as client:
        made = await client.create_token(
            admin_pb2.CreateTokenRequest(name=node_id, role=admin_pb2.ROLE_NODE)
        )
    return made.token


class _Relay:
    """A peer that poses as a node to the coordinator (which dials it) and relays everything
    between that session and the real node's Node.Attach, keeping whatever token passes."""

    def __init__(self, node_address: str) -> None:
        self.node_address = node_address
        self.port = 0
        self.tokens: list[str] = []
        self.relayed = asyncio.Event()  # a proof came back from the coordinator
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        relay = self

        class FakeNode(node_pb2_grpc.NodeServicer):
            async def Attach(self, request_iterator: Any, context: Any) -> Any:
                async with grpc.aio.insecure_channel(relay.node_address) as channel:
                    node = node_pb2_grpc.NodeStub(channel).Attach()
                    challenge = await node.read()  # the real node's challenge...
                    yield challenge  # ...to the coordinator that dialled this relay
                    proof = await anext(aiter(request_iterator))
                    relay.relayed.set()
                    await node.write(proof)  # and its proof back to the node
                    answer = await node.read()
                    if isinstance(answer, node_pb2.NodeMessage) and answer.HasField("hello"):
                        relay.tokens.append(answer.hello.token)

        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        node_pb2_grpc.add_NodeServicer_to_server(FakeNode(), self._server)  # type: ignore[abstract]
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)


async def test_a_relayed_attach_proof_is_refused_and_the_token_never_leaves_the_node(
    tmp_path: Path, started: Start, caplog: pytest.LogCaptureFixture
) -> None:
    node_port = free_port()
    relay = _Relay(f"127.0.0.1:{node_port}")
    await relay.start()
    try:
        # The coordinator is told to dial the relay (a `nodes` entry, or an mDNS record).
        coordinator = await started(_coordinator(tmp_path, nodes=[f"127.0.0.1:{relay.port}"]))
        token = await _token(coordinator, "n1")
        await started(
            NodeAgent(
                NodeSettings(
                    node_id="n1",
                    listen=f"127.0.0.1:{node_port}",
                    standalone=True,
                    token=token,
                    advertise="off",
                )
            )
        )
        await asyncio.wait_for(relay.relayed.wait(), 20)
        await eventually(lambda: "not an address of this node" in caplog.text, timeout=10)
        assert relay.tokens == []
    finally:
        await relay.stop()


async def test_the_coordinator_proves_itself_only_for_a_nodes_own_token(
    tmp_path: Path, started: Start
) -> None:
    coordinator = await started(_coordinator(tmp_path))
    admin_id = coordinator.admin_token_path.read_text().strip().split("_")[1]
    node_id = (await _token(coordinator, "n1")).split("_")[1]
    prove = coordinator.core.tokens.prove
    asked = {"address": coordinator.address, "nonce": b"n" * 32}
    for direction in Direction:
        assert len(prove(direction, token_id=node_id, node_id="n1", **asked)) == 32
        with pytest.raises(PermissionDenied):  # another node's token
            prove(direction, token_id=node_id, node_id="n2", **asked)
    # The admin's token: a node on the coordinator's machine may join with it, but an
    # attacker relaying a challenge for it gets nothing from an adopting coordinator.
    assert len(prove(Direction.JOIN, token_id=admin_id, node_id="n1", **asked)) == 32
    with pytest.raises(PermissionDenied):
        prove(Direction.ATTACH, token_id=admin_id, node_id="n1", **asked)
    with pytest.raises(Unauthenticated):
        prove(Direction.ATTACH, token_id="unknown", node_id="n1", **asked)


class _Impostor:
    """A coordinator look-alike a node finds first: it forwards Identify to the real one and
    keeps the token of any Connect."""

    def __init__(self, real: str) -> None:
        self.real = real
        self.port = 0
        self.tokens: list[str] = []
        self.identified = asyncio.Event()
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        impostor = self

        class Gateway(gateway_pb2_grpc.NodeGatewayServicer):
            async def Identify(self, request: node_pb2.Challenge, context: Any) -> node_pb2.Proof:
                impostor.identified.set()
                async with grpc.aio.insecure_channel(impostor.real) as channel:
                    stub = gateway_pb2_grpc.NodeGatewayStub(channel)
                    for address in (request.address, impostor.real):  # as is, then rewritten
                        challenge = node_pb2.Challenge()
                        challenge.CopyFrom(request)
                        challenge.address = address
                        with contextlib.suppress(grpc.aio.AioRpcError):
                            proof: node_pb2.Proof = await stub.Identify(challenge)
                            return proof
                return node_pb2.Proof()

            async def Connect(self, request_iterator: Any, context: Any) -> Any:
                for key, value in context.invocation_metadata():
                    if key == "authorization":
                        impostor.tokens.append(str(value))
                await context.abort(grpc.StatusCode.UNAVAILABLE, "gone")
                yield node_pb2.CoordinatorMessage()

        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        gateway_pb2_grpc.add_NodeGatewayServicer_to_server(Gateway(), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)


def _finding(node: NodeAgent, address: str) -> None:
    """The node's discovery finds `address` (as an mDNS answer or the loopback probe would)."""

    async def found() -> str:
        return address

    node.discovery.async_coordinator = found  # type: ignore[method-assign]


async def test_a_node_sends_its_token_only_to_a_coordinator_it_found_that_proves_itself(
    tmp_path: Path, started: Start, caplog: pytest.LogCaptureFixture
) -> None:
    coordinator = await started(_coordinator(tmp_path))
    impostor = _Impostor(coordinator.address)
    await impostor.start()
    try:
        token = await _token(coordinator, "n1")
        settings = NodeSettings(node_id="n1", token=token, advertise="off", cluster="proofs")
        node = NodeAgent(settings)
        _finding(node, f"127.0.0.1:{impostor.port}")
        await started(node)
        await asyncio.wait_for(impostor.identified.wait(), 20)
        await eventually(lambda: "will not send its token" in caplog.text, timeout=10)
        assert impostor.tokens == []
        assert not node.connected.is_set()

        # The real coordinator, found the same way, proves itself and the node joins.
        _finding(node, coordinator.address)
        await asyncio.wait_for(node.connected.wait(), 20)
    finally:
        await impostor.stop()


async def test_an_adopting_coordinator_dials_a_node_with_mtls(
    tmp_path: Path, started: Start
) -> None:
    pki = tmp_path / "pki"
    ca = certs.init_ca(pki)
    coordinator_cert, coordinator_key = certs.issue(pki, "coordinator", hosts=["127.0.0.1"])
    node_cert, node_key = certs.issue(pki, "n1", hosts=["127.0.0.1"])
    port = free_port()
    coordinator = await started(
        _coordinator(
            tmp_path,
            nodes=[f"127.0.0.1:{port}"],
            tls_cert=coordinator_cert,
            tls_key=coordinator_key,
            tls_client_ca=ca,
            require_client_cert=True,
        )
    )
    admin = coordinator.admin_token_path.read_text().strip()
    alice_cert, alice_key = certs.issue(pki, "alice")
    async with AsyncClient(
        coordinator.address, token=admin, tls_ca=ca, tls_cert=alice_cert, tls_key=alice_key
    ) as client:
        made = await client.create_token(
            admin_pb2.CreateTokenRequest(name="n1", role=admin_pb2.ROLE_NODE)
        )
        node = NodeAgent(
            NodeSettings(
                node_id="n1",
                listen=f"127.0.0.1:{port}",
                standalone=True,
                token=made.token,
                advertise="off",
                service_tls=True,
                service_require_client_cert=True,
                tls_ca=ca,
                tls_cert=node_cert,
                tls_key=node_key,
            )
        )
        await started(node)

        async def adopted() -> None:
            nodes = await client.nodes()
            assert [(n.info.node_id, n.adopted) for n in nodes if n.connected] == [("n1", True)]

        await eventually(adopted, timeout=20)
        task = await client.submit(shell("echo over tls"))
        done = await asyncio.wait_for(client.wait(task.id), 20)
        assert (done.state, done.result.stdout) == (task_pb2.TASK_STATE_SUCCEEDED, "over tls\n")

    # The node's service speaks only TLS, and only to callers with a certificate of its CA.
    for channel in (
        grpc.aio.insecure_channel(f"127.0.0.1:{port}"),
        open_channel(f"127.0.0.1:{port}", max_message_bytes=1 << 16, tls_ca=ca),
    ):
        async with channel:
            assert await check_health(channel, timeout=2) is Health.UNKNOWN
    async with open_channel(
        f"127.0.0.1:{port}",
        max_message_bytes=1 << 16,
        tls_ca=ca,
        tls_cert=coordinator_cert,
        tls_key=coordinator_key,
    ) as channel:
        assert await check_health(channel, timeout=5) is Health.SERVING
