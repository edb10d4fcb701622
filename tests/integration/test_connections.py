"""Connections a server holds: sockets that never speak, idle ones, caps, open-file limits."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shoal._server import raise_open_files_limit
from shoal.config import CoordinatorSettings
from shoal.coordinator.server import CoordinatorServer

from .harness import CliProcesses, eventually, free_port, wait_serving

pytestmark = pytest.mark.timeout(60)


@contextlib.asynccontextmanager
async def coordinator(tmp_path: Path, **settings: Any) -> AsyncIterator[CoordinatorServer]:
    server = CoordinatorServer(
        CoordinatorSettings(listen="127.0.0.1:0", data_dir=tmp_path / "data", **settings)
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0)


@contextlib.contextmanager
def silent_sockets(address: str, count: int) -> Iterator[list[socket.socket]]:
    """`count` TCP connections to `address` that never send a byte."""
    host, _, port = address.rpartition(":")
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.create_connection((host, int(port)))
            s.setblocking(False)
            sockets.append(s)
        yield sockets
    finally:
        for s in sockets:
            s.close()


def closed_by_peer(s: socket.socket) -> bool:
    try:
        while s.recv(65536):
            pass  # what the server sent before it closed (its SETTINGS)
    except BlockingIOError:
        return False
    except OSError:
        return True  # reset
    return True


async def health(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
    return int(answer.status)


async def test_sockets_that_never_speak_are_closed_and_block_no_call(tmp_path: Path) -> None:
    async with coordinator(tmp_path, handshake_timeout=timedelta(seconds=0.5)) as server:
        with silent_sockets(server.address, 200) as sockets:
            async with grpc.aio.insecure_channel(server.address) as channel:
                assert await health(channel) == health_pb2.HealthCheckResponse.SERVING

            def all_closed() -> None:
                assert all(closed_by_peer(s) for s in sockets)

            await eventually(all_closed)


async def test_connections_beyond_the_cap_are_refused_until_some_close(tmp_path: Path) -> None:
    settings = {"max_connections": 20, "handshake_timeout": timedelta(seconds=60)}
    async with coordinator(tmp_path, **settings) as server:
        with silent_sockets(server.address, 20):
            async with grpc.aio.insecure_channel(server.address) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await health(channel)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.insecure_channel(server.address) as channel:
            serving = await eventually(lambda: health(channel), retry_on=(grpc.aio.AioRpcError,))
            assert serving == health_pb2.HealthCheckResponse.SERVING


async def test_an_idle_connection_is_told_to_go(tmp_path: Path) -> None:
    async with (
        coordinator(tmp_path, idle_timeout=timedelta(seconds=0.5)) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        await health(channel)
        assert channel.get_state() == grpc.ChannelConnectivity.READY

        def idle() -> None:
            assert channel.get_state() == grpc.ChannelConnectivity.IDLE

        await eventually(idle)


async def test_a_connection_carries_at_most_max_streams_calls_at_once(tmp_path: Path) -> None:
    async with (
        coordinator(tmp_path, max_streams=2) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = health_pb2_grpc.HealthStub(channel)
        watches = [stub.Watch(health_pb2.HealthCheckRequest()) for _ in range(3)]
        reads = {asyncio.ensure_future(watch.read()): watch for watch in watches}
        pending = set(reads)
        while len(pending) > 1:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        served = [read for read in reads if read not in pending]
        started, _ = await asyncio.wait(pending, timeout=0.5)
        assert not started  # the third waits in the client for a stream of its connection
        reads[served[0]].cancel()
        (third,) = pending
        assert (await third).status == health_pb2.HealthCheckResponse.SERVING
        for watch in watches:
            watch.cancel()


async def test_a_coordinator_process_raises_its_open_file_limit(tmp_path: Path) -> None:
    raise_open_files_limit()  # this test holds 1,100 sockets too
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    port = free_port()
    processes = CliProcesses(tmp_path)
    try:
        proc = await processes.start(
            *("coordinator", "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "d")),
            prefix=("sh", "-c", 'ulimit -Sn 1024 && exec "$@"', "sh"),
        )
        await wait_serving(f"127.0.0.1:{port}")
        assert resource.prlimit(proc.pid, resource.RLIMIT_NOFILE) == (hard, hard)
        with silent_sockets(f"127.0.0.1:{port}", 1100):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                assert await health(channel) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await processes.aclose()
