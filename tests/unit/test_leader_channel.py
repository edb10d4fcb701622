"""Several coordinator addresses over TLS: one channel per address, each checked against the
certificate of its own address, and calls go to the one whose health is SERVING."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shoal import certs
from shoal._channel import open_channel
from shoal._leader import LeaderChannel
from tests.integration.harness import eventually

pytestmark = pytest.mark.timeout(30)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Coordinators:
    ca: Path
    addresses: list[str]
    health: list[health.aio.HealthServicer]


@pytest.fixture
async def coordinators(tmp_path: Path) -> AsyncIterator[Coordinators]:
    """Two TLS servers of health only, on 127.0.0.1 and 127.0.0.2, each with a certificate
    for its own address alone (one CA); the first SERVING, the second NOT_SERVING."""
    ca = certs.init_ca(tmp_path)
    servers: list[grpc.aio.Server] = []
    made = Coordinators(ca, [], [])
    try:
        for i, host in enumerate(("127.0.0.1", "127.0.0.2")):
            cert, key = certs.issue(tmp_path, f"c{i}", hosts=[host])
            server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            servicer = health.aio.HealthServicer()
            await servicer.set("", SERVING if i == 0 else NOT_SERVING)
            health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
            credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
            port = server.add_secure_port(f"{host}:0", credentials)
            await server.start()
            servers.append(server)
            made.addresses.append(f"{host}:{port}")
            made.health.append(servicer)
        yield made
    finally:
        for server in servers:
            await server.stop(None)


async def test_calls_go_to_the_serving_address_and_follow_a_takeover(
    coordinators: Coordinators,
) -> None:
    channel = open_channel(
        ",".join(coordinators.addresses), max_message_bytes=1 << 16, tls_ca=coordinators.ca
    )
    assert isinstance(channel, LeaderChannel)
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        assert await channel.found(10) == coordinators.addresses[0]
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == SERVING  # the first: a call to the standby would say otherwise

        await coordinators.health[0].set("", NOT_SERVING)
        await coordinators.health[1].set("", SERVING)

        async def followed() -> None:
            assert channel.leader == coordinators.addresses[1]

        await eventually(followed, timeout=10)
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == SERVING
    finally:
        await channel.close()
    # Nothing left watching once it is closed.
    assert not channel._watchers
    assert not [t for t in asyncio.all_tasks() if (t.get_name() or "").startswith("shoal-leader")]


async def test_no_serving_address_is_found_within_the_timeout(
    coordinators: Coordinators,
) -> None:
    await coordinators.health[0].set("", NOT_SERVING)
    async with open_channel(
        ",".join(coordinators.addresses), max_message_bytes=1 << 16, tls_ca=coordinators.ca
    ) as channel:
        assert isinstance(channel, LeaderChannel)
        assert await channel.found(0.5) == ""
