"""Standby coordinators on one PostgreSQL store: the standby answers NOT_SERVING and
UNAVAILABLE naming the leader; when the leader is killed (SIGKILL) it leads within seconds,
with every task the leader accepted; nodes and clients given every address follow it, over
TLS too (a certificate for each coordinator)."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2

from shoal import AsyncClient, certs
from shoal._channel import open_channel
from shoal._health import Health, check_health
from shoal.config import ADMIN_TOKEN_FILE
from shoal.errors import Unavailable
from shoal.v1 import task_pb2

from .harness import (
    BIN,
    CliProcess,
    CliProcesses,
    eventually,
    free_port,
    health_status,
    run_tool,
    wait_serving,
)

TAKEOVER = 5.0  # seconds a standby may take to lead once the leader is gone


async def _coordinator(
    cli: CliProcesses, url: str, port: int, name: str, http_port: int = 0
) -> CliProcess:
    return await cli.start(
        "coordinator",
        "--listen",
        f"127.0.0.1:{port}",
        *(("--http-listen", f"127.0.0.1:{http_port}") if http_port else ()),
        "--store",
        url,
        "--no-auth",
        "--data-dir",
        str(cli.tmp_path / name),
        name=name,
        log_name=f"{name}.log",
    )


def _spec(i: int) -> task_pb2.TaskSpec:
    return task_pb2.TaskSpec(shell=task_pb2.ShellSpec(argv=["echo", str(i)]))


@pytest.mark.timeout(120)
async def test_a_standby_takes_over_from_a_killed_leader(
    cli: CliProcesses, postgres_url: str
) -> None:
    first_port, second_port = free_port(), free_port()
    first = await _coordinator(cli, postgres_url, first_port, "first")
    await wait_serving(f"127.0.0.1:{first_port}")
    http_port = free_port()
    second = await _coordinator(cli, postgres_url, second_port, "second", http_port)
    standby = f"127.0.0.1:{second_port}"
    standby_http = f"http://127.0.0.1:{http_port}"

    async def not_serving() -> None:
        assert await health_status(standby) == health_pb2.HealthCheckResponse.NOT_SERVING

    await eventually(not_serving, timeout=30, retry_on=(AssertionError, grpc.RpcError))
    shown = await run_tool([str(BIN / "shoal"), "store", "status", "--store", postgres_url])
    assert shown.returncode == 0, shown.stderr
    assert f"leader      127.0.0.1:{first_port} epoch 1" in shown.stdout
    assert f"standby     {standby}" in shown.stdout
    roles = await run_tool(
        [str(BIN / "shoal"), "status", "-c", f"127.0.0.1:{first_port},{standby}"]
    )
    assert roles.returncode == 0, roles.stderr
    assert roles.stdout == f"leader     127.0.0.1:{first_port}\nstandby    {standby}\n"
    async with AsyncClient(standby, token="unused") as client:
        with pytest.raises(Unavailable, match=f"the leader is at 127.0.0.1:{first_port}"):
            await client.submit(_spec(0))
    # Its HTTP API answers as its gRPC does: 503 naming the leader; the page itself loads.
    async with httpx.AsyncClient(base_url=standby_http, timeout=20) as http:
        for method, path in (
            ("POST", "/api/shoal.v1.Tasks/List"),
            ("GET", "/api/whoami"),
            ("GET", "/api/events"),
        ):
            refused = await http.request(method, path, json={} if method == "POST" else None)
            assert refused.status_code == 503, refused.text
            body = refused.json()
            assert body["code"] == "unavailable", body
            assert f"the leader is at 127.0.0.1:{first_port}" in body["message"], body
        assert (await http.get("/")).status_code == 200

    both = f"127.0.0.1:{first_port},127.0.0.1:{second_port}"
    # Auth is off: the node presents whatever the token file (the cli fixture's) holds.
    (cli.tmp_path / "data").mkdir(exist_ok=True)
    (cli.tmp_path / "data" / ADMIN_TOKEN_FILE).write_text("unused\n")
    await cli.start("node", "-c", both, "--node-id", "n1", "--slots", "4", name="n1")
    follower = AsyncClient(both, token="unused")
    try:
        await eventually(lambda: _one_node(follower), timeout=30)
        ids = await follower.submit_batch([_spec(i) for i in range(50)])
        for task_id in ids[:5]:
            assert (await follower.wait(task_id)).state == task_pb2.TASK_STATE_SUCCEEDED
        await _after_the_kill(cli, first, standby, follower, ids)
        async with httpx.AsyncClient(base_url=standby_http, timeout=20) as http:
            listed = await http.post("/api/shoal.v1.Tasks/List", json={"limit": 1})
            assert listed.status_code == 200, listed.text
    finally:
        await follower.close()
    assert second.running


async def _one_node(client: AsyncClient) -> None:
    assert [n.info.node_id for n in await client.nodes() if n.connected] == ["n1"]


async def _after_the_kill(
    cli: CliProcesses, first: CliProcess, standby: str, follower: AsyncClient, ids: list[str]
) -> None:
    await first.kill()
    killed = time.monotonic()
    await wait_serving(standby, timeout=30)
    took = time.monotonic() - killed
    print(f"takeover after SIGKILL: {took:.2f} s")
    assert took < TAKEOVER + 2, cli.logs()  # + the health poll and a busy machine's slack
    # The client and the node given both addresses follow the new leader: every task the
    # killed one accepted runs to its end, and new ones too.
    more = await follower.submit_batch([_spec(i) for i in range(50, 60)])
    for task_id in [*ids, *more]:
        assert (await follower.wait(task_id)).state == task_pb2.TASK_STATE_SUCCEEDED


async def _tls_health(address: str, ca: Path) -> Health:
    async with open_channel(address, max_message_bytes=1 << 16, tls_ca=ca) as channel:
        return await check_health(channel, timeout=2.0)


@pytest.mark.timeout(120)
async def test_over_tls_a_node_and_a_client_given_every_address_follow_the_leader(
    cli: CliProcesses, postgres_url: str, tmp_path: Path
) -> None:
    # One CA; each coordinator's certificate names its own address only.
    pki = tmp_path / "pki"
    ca = certs.init_ca(pki)
    addresses = [f"127.0.0.1:{free_port()}", f"127.0.0.2:{free_port()}"]
    coordinators: list[CliProcess] = []
    for i, address in enumerate(addresses):
        cert, key = certs.issue(pki, f"coordinator-{i}", hosts=[address.rsplit(":", 1)[0]])
        coordinators.append(
            await cli.start(
                "coordinator",
                "--listen",
                address,
                "--store",
                postgres_url,
                "--data-dir",
                str(tmp_path / "data"),  # shared: one local admin token
                "--tls-cert",
                str(cert),
                "--tls-key",
                str(key),
                name=f"c{i}",
                log_name=f"c{i}.log",
            )
        )
        expected = Health.SERVING if i == 0 else Health.NOT_SERVING

        async def answers(address: str = address, expected: Health = expected) -> None:
            assert await _tls_health(address, ca) == expected, cli.logs()

        await eventually(answers, timeout=30, interval=0.1)

    both = ",".join(addresses)
    await cli.start("node", "-c", both, "--node-id", "n1", "--slots", "2", "--tls-ca", str(ca))
    token = (tmp_path / "data" / ADMIN_TOKEN_FILE).read_text().strip()
    async with AsyncClient(both, token=token, tls_ca=ca, retry_for=timedelta(seconds=30)) as client:
        await eventually(lambda: _one_node(client), timeout=30)
        first = await client.submit(_spec(1))
        assert (await client.wait(first.id)).state == task_pb2.TASK_STATE_SUCCEEDED

        await coordinators[0].kill()
        await eventually(lambda: _one_node(client), timeout=30, interval=0.1)
        second = await client.submit(_spec(2))
        done = await client.wait(second.id)
        assert (done.state, done.node_id) == (task_pb2.TASK_STATE_SUCCEEDED, "n1")
    assert await _tls_health(addresses[1], ca) == Health.SERVING
