"""Where the HTTP API listens: gRPC's rules (auth off only on loopback; TLS from the same
files), loopback Host names with auth off, and a clear refusal of a port in use."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import httpx
import pytest

from shoal import certs
from shoal.config import CoordinatorSettings
from shoal.coordinator.server import CoordinatorServer
from shoal.errors import FailedPrecondition

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
