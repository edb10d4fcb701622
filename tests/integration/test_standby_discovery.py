"""Standby coordinators on mDNS: every coordinator of a PostgreSQL store advertises itself,
leader and standby alike, and a node that finds them by mDNS joins the one that serves, and
the new leader after the old one is killed.

A LAN of network namespaces (see lan.py); PostgreSQL runs in the root namespace, reached at
the observer's address. Root only: skipped elsewhere, but not in CI, where it fails instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncZeroconf

from shoal import AsyncClient, shell
from shoal._mdns import Browser, decode_coordinator
from shoal.config import ADMIN_TOKEN_FILE
from shoal.discovery import COORDINATOR_SERVICE, CoordinatorAd
from shoal.v1 import task_pb2
from tests.chaos.summary import publish
from tests.postgres import postgres_server

from .harness import CliProcess, CliProcesses, eventually, health_status, wait_serving
from .lan import Host, Lan, lan_unavailable
from .test_discovery import _need, _node

pytestmark = pytest.mark.timeout(180)

PORT = 7070
SERVING, NOT_SERVING = 1, 2  # grpc.health.v1


@pytest.fixture
async def lan() -> AsyncIterator[Lan]:
    """Hosts a, b and p on one bridge; everything is removed in teardown (ask for it first)."""
    _need(lan_unavailable())
    made = Lan.for_this_process()
    await made.create(["a", "b", "p"])
    try:
        yield made
    finally:
        await made.delete()


async def _coordinator(cli: CliProcesses, host: Host, store: str, data_dir: Path) -> CliProcess:
    """`shoal coordinator` on `store` in `host` (auth on, advertising); returned once it
    answers health checks, leading or standing by."""
    address = f"{host.ip}:{PORT}"
    proc = await cli.start(
        "coordinator",
        "--listen",
        address,
        "--store",
        store,
        "--data-dir",
        str(data_dir),
        prefix=host.exec_prefix(),
        name=f"coordinator-{host.name}",
    )

    async def answers() -> int:
        assert proc.running, cli.logs()
        try:
            return await health_status(address)
        except Exception as err:
            raise AssertionError(f"{address}: {err}") from None

    await eventually(answers, timeout=60, interval=0.1)
    return proc


async def test_a_node_found_by_mdns_follows_the_serving_coordinator_to_the_standby(
    lan: Lan, cli: CliProcesses, tmp_path: Path
) -> None:
    a, b, p = lan.hosts["a"], lan.hosts["b"], lan.hosts["p"]
    data_dir = tmp_path / "data"  # shared: either coordinator's admin token is the same
    with contextlib.ExitStack() as stack:
        server = await asyncio.to_thread(stack.enter_context, postgres_server([lan.observer_ip]))
        url = await asyncio.to_thread(server.database)
        store = server.url(url.rsplit("/", 1)[1], host=lan.observer_ip)
        zc = AsyncZeroconf(interfaces=[lan.observer_ip], ip_version=IPVersion.V4Only)
        seen: Browser[CoordinatorAd] = Browser(zc, COORDINATOR_SERVICE, decode_coordinator)
        seen.async_start()
        try:
            leader = await _coordinator(cli, a, store, data_dir)
            await wait_serving(f"{a.ip}:{PORT}")  # it leads
            await _coordinator(cli, p, store, data_dir)
            assert await health_status(f"{p.ip}:{PORT}") == NOT_SERVING, cli.logs()

            # Both advertise: the standby too. (Only this LAN's: the chaos tests' namespaces,
            # running beside it, reach the root namespace's multicast as well.)
            def both_advertised() -> None:
                ads = seen.seen.values()
                addresses = sorted(d.address for d in ads if d.address.startswith(f"{lan.subnet}."))
                expected = sorted([f"{a.ip}:{PORT}", f"{p.ip}:{PORT}"])
                assert addresses == expected, f"{addresses}\n{cli.logs()}"

            await eventually(both_advertised, timeout=20)

            await _node(cli, b, "b")  # no address: it finds them by mDNS
            token = (data_dir / ADMIN_TOKEN_FILE).read_text().strip()
            everyone = f"{a.ip}:{PORT},{p.ip}:{PORT}"
            async with AsyncClient(
                everyone, token=token, retry_for=timedelta(seconds=30)
            ) as client:

                async def joined() -> None:
                    nodes = {n.info.node_id for n in await client.nodes() if n.connected}
                    assert nodes == {"b"}, f"{nodes}\n{cli.logs()}"

                await eventually(joined, timeout=30, interval=0.1)

                assert await leader.kill() == -signal.SIGKILL
                killed = time.monotonic()
                await eventually(joined, timeout=30, interval=0.1)
                followed = time.monotonic() - killed
                task_id = (await client.submit(shell("echo moved"))).id
                done = await asyncio.wait_for(client.wait(task_id), 30)
                assert done.state == task_pb2.TASK_STATE_SUCCEEDED, done
                assert done.node_id == "b"
            assert await health_status(f"{p.ip}:{PORT}") == SERVING
            publish(
                f"discovery: node b, found by mDNS, joined the standby {followed:.2f} s after"
                " the leader was killed"
            )
        finally:
            await cli.aclose()  # before PostgreSQL goes
            await seen.async_close()
            await zc.async_close()
