"""TLS and mTLS end to end: certificates from `shoal.certs`, a coordinator that requires them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from shoal import AsyncClient, certs, shell
from shoal._channel import bearer, open_channel
from shoal.config import CoordinatorSettings, NodeSettings
from shoal.coordinator.server import CoordinatorServer
from shoal.errors import FailedPrecondition, Unavailable
from shoal.node.agent import NodeAgent
from shoal.v1 import gateway_pb2_grpc, node_pb2, task_pb2

from .harness import STARTUP

pytestmark = pytest.mark.timeout(60)
SHORT = timedelta(seconds=5)
NO_RETRY = timedelta(0)


@dataclass
class Pki:
    ca: Path
    good: tuple[Path, Path]  # node-a, signed by our CA
    alice: tuple[Path, Path]  # a client, signed by our CA
    self_signed: tuple[Path, Path]
    other_ca: tuple[Path, Path]
    expired: tuple[Path, Path]


@dataclass
class Secured:
    coordinator: CoordinatorServer
    pki: Pki
    token: str

    @property
    def address(self) -> str:
        return self.coordinator.address

    def client(self, cert: tuple[Path, Path] | None) -> AsyncClient:
        cert_path, key_path = cert if cert else (None, None)
        return AsyncClient(
            self.address,
            token=self.token,
            tls_ca=self.pki.ca,
            tls_cert=cert_path,
            tls_key=key_path,
            timeout=SHORT,
            retry_for=NO_RETRY,  # a refused handshake is not worth waiting out here
        )


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[Secured]:
    ours, other = tmp_path / "pki", tmp_path / "other-pki"
    ca = certs.init_ca(ours)
    certs.init_ca(other)
    server_cert, server_key = certs.issue(ours, "coordinator", hosts=["localhost", "127.0.0.1"])
    now = datetime.now(UTC)
    pki = Pki(
        ca=ca,
        good=certs.issue(ours, "node-a"),
        alice=certs.issue(ours, "alice"),
        self_signed=certs.self_signed(tmp_path / "self", "node-a"),
        other_ca=certs.issue(other, "node-a"),
        expired=certs.issue(
            ours, "late", not_before=now - timedelta(days=30), not_after=now - timedelta(days=1)
        ),
    )
    coordinator = CoordinatorServer(
        CoordinatorSettings(
            listen="127.0.0.1:0",
            data_dir=tmp_path / "data",
            tls_cert=server_cert,
            tls_key=server_key,
            tls_client_ca=ca,
            require_client_cert=True,
        )
    )
    await coordinator.start()
    try:
        token = coordinator.admin_token_path.read_text().strip()
        yield Secured(coordinator, pki, token)
    finally:
        await coordinator.stop()


async def test_a_node_and_a_client_with_good_certificates_run_a_task(secured: Secured) -> None:
    cert, key = secured.pki.good
    node = NodeAgent(
        NodeSettings(
            coordinator=secured.address,
            node_id="node-a",
            listen="127.0.0.1:0",
            token=secured.token,
            tls_ca=secured.pki.ca,
            tls_cert=cert,
            tls_key=key,
            slots=1,
        )
    )
    await node.start()
    try:
        await asyncio.wait_for(node.connected.wait(), STARTUP)
        async with secured.client(secured.pki.alice) as client:
            task = await client.submit(shell(["echo", "over mtls"]))
            done = await client.wait(task.id, timeout=timedelta(seconds=20))
    finally:
        await node.stop()
    assert done.state == task_pb2.TASK_STATE_SUCCEEDED
    assert done.result.stdout == "over mtls\n"
    assert done.node_id == "node-a"


@pytest.mark.parametrize("which", ["none", "self_signed", "other_ca", "expired"])
async def test_a_bad_client_certificate_is_refused(secured: Secured, which: str) -> None:
    cert = None if which == "none" else getattr(secured.pki, which)
    async with secured.client(cert) as client:
        with pytest.raises(Unavailable):
            await client.list()


async def test_plaintext_is_refused(secured: Secured) -> None:
    async with AsyncClient(
        secured.address, token=secured.token, timeout=SHORT, retry_for=NO_RETRY
    ) as client:
        with pytest.raises(Unavailable):
            await client.list()


async def test_a_node_certificate_cannot_claim_another_node(secured: Secured) -> None:
    async def connect_as(node_id: str) -> node_pb2.CoordinatorMessage:
        cert, key = secured.pki.good  # the certificate of node-a
        channel = open_channel(
            secured.address,
            max_message_bytes=1 << 20,
            tls_ca=secured.pki.ca,
            tls_cert=cert,
            tls_key=key,
        )
        try:
            call = gateway_pb2_grpc.NodeGatewayStub(channel).Connect(
                metadata=bearer(secured.token), timeout=10
            )
            hello = node_pb2.Hello(info=node_pb2.NodeInfo(node_id=node_id))
            await call.write(node_pb2.NodeMessage(hello=hello))
            first: node_pb2.CoordinatorMessage = await call.read()
            call.cancel()
            return first
        finally:
            await channel.close()

    assert (await connect_as("node-a")).HasField("welcome")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await connect_as("node-b")
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "certificate is for 'node-a'" in (refused.value.details() or "")


async def test_a_client_ca_without_required_client_certificates_is_refused_at_start(
    tmp_path: Path,
) -> None:
    ca = certs.init_ca(tmp_path / "pki")
    cert, key = certs.issue(tmp_path / "pki", "coordinator", hosts=["127.0.0.1"])
    coordinator = CoordinatorServer(
        CoordinatorSettings(
            listen="127.0.0.1:0",
            data_dir=tmp_path / "data",
            tls_cert=cert,
            tls_key=key,
            tls_client_ca=ca,  # gRPC would never ask for client certificates
        )
    )
    with pytest.raises(FailedPrecondition, match="tls_client_ca needs require_client_cert"):
        await coordinator.start()
