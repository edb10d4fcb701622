"""Where the HTTP API listens: gRPC's rules (auth off only on loopback; TLS from the same
files), loopback Host names with auth off, a clear refusal of a port in use, and the
connections it keeps (under the open-file limit, beside gRPC's)."""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import ssl
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2

from shoal import certs
from shoal._server import raise_open_files_limit
from shoal.config import CoordinatorSettings
from shoal.coordinator.http import listener
from shoal.coordinator.server import CoordinatorServer
from shoal.errors import FailedPrecondition

from .harness import CliProcesses, eventually, free_port, wait_serving
from .test_connections import closed_by_peer, health, silent_sockets

pytestmark = pytest.mark.timeout(60)


async def test_auth_off_beyond_loopback_is_refused_at_start(tmp_path: Path) -> None:
    server = CoordinatorServer(
        CoordinatorSettings(
            listen="127.0.0.1:0", data_dir=tmp_path, auth=False, http_listen="0.0.0.0:0"
        )
    )
    with pytest.raises(
        FailedPrecondition, match=r"refusing to listen on 0\.0\.0\.0:0 with auth off"
    ):
        await server.start()


async def test_with_auth_off_only_loopback_names_are_answered(tmp_path: Path) -> None:
    server = CoordinatorServer(
        CoordinatorSettings(
            listen="127.0.0.1:0", data_dir=tmp_path, auth=False, http_listen="127.0.0.1:0"
        )
    )
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            who = await http.get("/api/whoami")
            assert who.json()["role"] == "admin"  # no token needed: auth is off
            for host in ("localhost:7080", "[::1]", "127.0.0.2"):
                response = await http.get("/api/whoami", headers={"Host": host})
                assert response.status_code == 200, host
            rebound = await http.get("/api/whoami", headers={"Host": "evil.example:7080"})
            assert rebound.status_code == 403 and "loopback" in rebound.json()["message"]
    finally:
        await server.stop()


async def test_https_uses_the_grpc_certificate_and_secure_cookies(tmp_path: Path) -> None:
    ca = certs.init_ca(tmp_path / "pki")
    cert, key = certs.issue(tmp_path / "pki", "coordinator", hosts=["127.0.0.1"])
    server = CoordinatorServer(
        CoordinatorSettings(
            listen="127.0.0.1:0",
            data_dir=tmp_path / "data",
            tls_cert=cert,
            tls_key=key,
            http_listen="127.0.0.1:0",
        )
    )
    await server.start()
    try:
        assert server.http_url.startswith("https://")
        token = server.admin_token_path.read_text().strip()
        trust = ssl.create_default_context(cafile=str(ca))
        async with httpx.AsyncClient(base_url=server.http_url, verify=trust) as http:
            login = await http.post("/api/login", json={"token": token})
            assert login.status_code == 200
            assert all("Secure" in c for c in login.headers.get_list("set-cookie"))
        async with httpx.AsyncClient(base_url=server.http_url.replace("https", "http")) as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.get("/api/whoami")
    finally:
        await server.stop()


async def test_a_port_in_use_is_named(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = CoordinatorServer(
            CoordinatorSettings(
                listen="127.0.0.1:0", data_dir=tmp_path, http_listen=f"127.0.0.1:{port}"
            )
        )
        with pytest.raises(OSError, match="address already in use"):
            await server.start()
        assert server.http is None


async def test_connections_past_the_limit_are_closed_at_once_and_grpc_stays_reachable(
    tmp_path: Path,
) -> None:
    """With 400 files to open, a coordinator keeps at most (400 - 256) / 2 HTTP connections
    (the rest are for gRPC's): more are closed as soon as they are accepted, in one log line,
    and gRPC still answers; as they close, HTTP answers again."""
    raise_open_files_limit()  # this test holds 500 sockets
    limit = (400 - 256) // 2
    grpc_address, http_port = f"127.0.0.1:{free_port()}", free_port()
    processes = CliProcesses(tmp_path)
    try:
        coordinator = await processes.start(
            *("coordinator", "--listen", grpc_address, "--data-dir", str(tmp_path / "d")),
            *("--http-listen", f"127.0.0.1:{http_port}"),
            prefix=("sh", "-c", 'ulimit -n 400 && exec "$@"', "sh"),
        )
        await wait_serving(grpc_address)
        with contextlib.ExitStack() as stack:
            sockets: list[socket.socket] = []

            def past_the_limit_closed() -> None:
                assert sum(closed_by_peer(s) for s in sockets) == max(0, len(sockets) - limit)

            # 50 at a time, within the listening socket's backlog: each is accepted at once.
            for _ in range(10):
                sockets += stack.enter_context(silent_sockets(f"127.0.0.1:{http_port}", 50))
                await eventually(past_the_limit_closed)
            async with grpc.aio.insecure_channel(grpc_address) as channel:
                assert await health(channel) == health_pb2.HealthCheckResponse.SERVING
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as http:
            answer = await eventually(
                lambda: http.get("/api/openapi.json"), retry_on=(httpx.HTTPError,)
            )
            assert answer.status_code == 200
        log = coordinator.output()
        assert log.count(f"HTTP has {limit} connections open") == 1, log[-2000:]
        assert "out of system resource" not in log
    finally:
        await processes.aclose()


async def test_accepts_that_fail_for_want_of_files_are_logged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An accept that fails for want of files is tried again a moment later, and told in one
    line however often it fails (asyncio's own loop logs each, with its traceback)."""
    server = CoordinatorServer(
        CoordinatorSettings(listen="127.0.0.1:0", data_dir=tmp_path, http_listen="127.0.0.1:0")
    )
    await server.start()
    try:
        failures = 200
        accept = socket.socket.accept

        def out_of_files(sock: socket.socket) -> tuple[socket.socket, object]:
            nonlocal failures
            if failures:
                failures -= 1
                raise OSError(errno.EMFILE, "Too many open files")
            return accept(sock)

        monkeypatch.setattr(listener, "_RETRY_SECONDS", 0.001)
        monkeypatch.setattr(socket.socket, "accept", out_of_files)
        with caplog.at_level(logging.WARNING):
            async with httpx.AsyncClient(base_url=server.http_url, timeout=30) as http:
                assert (await http.get("/api/openapi.json")).status_code == 200
        assert failures == 0
        told = [r for r in caplog.records if "accept" in r.getMessage()]
        assert len(told) == 1 and "Too many open files" in told[0].getMessage(), told
    finally:
        await server.stop()
