"""Discovery on a LAN of network namespaces: coordinators and nodes find each other by mDNS.

Hosts a (coordinator), b and c (nodes), p (a peer: avahi, `shoal discover`, a second
coordinator) on one bridge; this process watches from the root namespace (see lan.py). Root
only: skipped elsewhere, but not in CI, where it fails instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import shutil
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncZeroconf

from shoal import AsyncClient, shell
from shoal._mdns import Browser, decode_coordinator, decode_node
from shoal.config import ADMIN_TOKEN_FILE
from shoal.discovery import COORDINATOR_SERVICE, NODE_SERVICE, CoordinatorAd, NodeAd
from shoal.v1 import admin_pb2, task_pb2
from tests.chaos.summary import publish

from .harness import (
    BIN,
    CliProcess,
    CliProcesses,
    eventually,
    process_gone,
    run_tool,
    wait_serving,
)
from .lan import Host, Lan, lan_unavailable

pytestmark = pytest.mark.timeout(120)

# Bounds that hold on a loaded machine (the figures are printed; typical: about 1 s).
JOIN_WITHIN = 30.0  # seconds from a node's start to its session with the coordinator it found
SEEN_WITHIN = 20.0  # seconds from a node's start of service to a running browser seeing it
PORT = 7070
SHOAL = str(BIN / "shoal")


def _need(reason: str) -> None:
    """Skip for `reason` on a developer's machine; fail in CI, where it must run."""
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"discovery tests cannot run: {reason}")
        pytest.skip(reason)


@pytest.fixture
async def lan() -> AsyncIterator[Lan]:
    """Hosts a, b, c and p on one bridge; everything is removed in teardown.

    Ask for it before `cli`: fixtures end in reverse order, so processes inside its
    namespaces are gone before they are.
    """
    _need(lan_unavailable())
    made = Lan.for_this_process()
    await made.create(["a", "b", "c", "p"])
    try:
        yield made
    finally:
        await made.delete()


@pytest.fixture
async def observer(lan: Lan) -> AsyncIterator[tuple[Browser[CoordinatorAd], Browser[NodeAd]]]:
    """Browsers of coordinators and nodes, running in this process on the LAN."""
    zc = AsyncZeroconf(interfaces=[lan.observer_ip], ip_version=IPVersion.V4Only)
    coordinators = Browser(zc, COORDINATOR_SERVICE, decode_coordinator)
    nodes = Browser(zc, NODE_SERVICE, decode_node)
    coordinators.async_start()
    nodes.async_start()
    try:
        yield coordinators, nodes
    finally:
        await coordinators.async_close()
        await nodes.async_close()
        await zc.async_close()


@dataclass(frozen=True)
class AvahiPeer:
    """avahi-daemon and its D-Bus, running in one host with a /run of their own."""

    daemon_pid: int

    def exec_prefix(self) -> list[str]:
        """Prepend to an argv to run it beside them (their network and mount namespaces)."""
        return ["nsenter", "--target", str(self.daemon_pid), "--net", "--mount"]


@pytest.fixture
async def avahi(lan: Lan) -> AsyncIterator[AvahiPeer]:
    """Debian's avahi-daemon (and a system D-Bus for it) running in host p; killed in teardown.

    Both get a /run of their own (tmpfs mounts in the mount namespace `ip netns exec` makes),
    so they meet no other instance and leave nothing behind.
    """
    tools = ("avahi-daemon", "avahi-browse", "dbus-daemon", "nsenter")
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        _need(f"not installed: {', '.join(missing)} (apt-get install avahi-utils avahi-daemon)")
    host = lan.hosts["p"]
    script = (
        "set -e; mkdir -p /run/dbus /run/avahi-daemon;"
        " mount -t tmpfs tmpfs /run/dbus; mount -t tmpfs tmpfs /run/avahi-daemon;"
        " dbus-daemon --system --fork --print-pid;"
        " avahi-daemon -D --no-chroot --no-drop-root; cat /run/avahi-daemon/pid"
    )
    started = await run_tool([*host.exec_prefix(), "sh", "-c", script], timeout=20)
    pids = [int(word) for word in started.stdout.split() if word.isdigit()]
    try:
        assert started.returncode == 0 and len(pids) == 2, started
        yield AvahiPeer(pids[1])
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in pids:
            await eventually(lambda: process_gone(pid), timeout=10)  # noqa: B023


async def _coordinator(cli: CliProcesses, host: Host, data_dir: Path, *args: str) -> CliProcess:
    """`shoal coordinator` in `host`, on its LAN address (auth on); returned once serving."""
    address = f"{host.ip}:{PORT}"
    proc = await cli.start(
        "coordinator",
        "--listen",
        address,
        "--data-dir",
        str(data_dir),
        *args,
        prefix=host.exec_prefix(),
        name=f"coordinator-{host.name}",
    )
    try:
        await wait_serving(address)
    except AssertionError as err:
        raise AssertionError(f"the coordinator did not come up:\n{cli.logs()}") from err
    return proc


async def _node(cli: CliProcesses, host: Host, node_id: str, *args: str) -> CliProcess:
    """`shoal node` in `host`, its service on the LAN address: no coordinator address."""
    return await cli.start(
        "node",
        "--node-id",
        node_id,
        "--listen",
        f"{host.ip}:0",
        "--slots",
        "2",
        "--label",
        f"host={node_id}",
        *args,
        prefix=host.exec_prefix(),
        name=node_id,
    )


def _no_coordinator_token(tmp_path: Path) -> None:
    """The token file nodes read (see the `cli` fixture), for tests without a coordinator."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / ADMIN_TOKEN_FILE).write_text("no-coordinator-to-join\n")


def _client(host: Host, data_dir: Path) -> AsyncClient:
    token = (data_dir / ADMIN_TOKEN_FILE).read_text().strip()
    return AsyncClient(f"{host.ip}:{PORT}", token=token)


async def _joined(client: AsyncClient) -> set[str]:
    return {n.info.node_id for n in await client.nodes() if n.connected}


async def test_nodes_without_an_address_find_the_coordinator_join_and_run_tasks(
    lan: Lan,
    cli: CliProcesses,
    observer: tuple[Browser[CoordinatorAd], Browser[NodeAd]],
    tmp_path: Path,
) -> None:
    coordinators, nodes = observer
    a, b, c = lan.hosts["a"], lan.hosts["b"], lan.hosts["c"]
    data_dir = tmp_path / "data"
    await _coordinator(cli, a, data_dir)

    # The coordinator advertises itself with what a node needs to know, no secret.
    ad = await eventually(lambda: _only(coordinators.seen.values()), timeout=5)
    assert (ad.address, ad.cluster, ad.auth, ad.tls) == (f"{a.ip}:{PORT}", "default", True, False)

    started: dict[str, float] = {}
    for host, node_id in ((b, "b"), (c, "c")):
        started[node_id] = time.monotonic()
        await _node(cli, host, node_id)

    async with _client(a, data_dir) as client:
        joined_at: dict[str, float] = {}
        seen_at: dict[str, float] = {}

        async def watch_joins() -> None:
            while len(joined_at) < 2:
                for node_id in await _joined(client):
                    joined_at.setdefault(node_id, time.monotonic())
                await asyncio.sleep(0.02)

        async def watch_browser() -> None:
            while len(seen_at) < 2:
                version = nodes.version
                for seen in nodes.seen.values():
                    seen_at.setdefault(seen.node_id, time.monotonic())
                await nodes.async_changed(1.0, since=version)

        try:
            async with asyncio.timeout(20):
                await asyncio.gather(watch_joins(), watch_browser())
        except TimeoutError:
            raise AssertionError(f"joined {joined_at}, seen {seen_at}:\n{cli.logs()}") from None
        for node_id in ("b", "c"):
            join = joined_at[node_id] - started[node_id]
            seen = seen_at[node_id] - started[node_id]
            publish(
                f"discovery: node {node_id} joined {join:.2f} s after it was started (no"
                f" address given); a running browser saw it {seen:.2f} s after it was started"
            )
            assert join < JOIN_WITHIN, cli.logs()

        # Each node runs tasks (pinned by label), and the coordinator watches its health.
        ids = await client.submit_batch(
            [shell("echo $((6 * 7))", labels={"host": node_id}) for node_id in ("b", "c")]
        )
        for task_id, node_id in zip(ids, ("b", "c"), strict=True):
            task = await asyncio.wait_for(client.wait(task_id), 20)
            assert task.state == task_pb2.TASK_STATE_SUCCEEDED, task
            assert (task.node_id, task.result.stdout) == (node_id, "42\n")

        async def both_serving() -> None:
            listed = {n.info.node_id: n for n in await client.nodes()}
            assert sorted(listed) == ["b", "c"]
            for n in listed.values():
                assert n.connected and n.health == admin_pb2.NODE_HEALTH_SERVING, n

        await eventually(both_serving, timeout=10)

        # What a node advertises: its capabilities, no secret.
        b_ad = next(n for n in nodes.seen.values() if n.node_id == "b")
        assert b_ad.address.startswith(f"{b.ip}:")
        assert {"shell", "python"} <= set(b_ad.executors)
        assert (b_ad.labels, b_ad.cluster) == ({"host": "b"}, "default")


async def test_a_browser_sees_a_node_within_two_seconds_of_its_start(
    lan: Lan,
    cli: CliProcesses,
    observer: tuple[Browser[CoordinatorAd], Browser[NodeAd]],
    tmp_path: Path,
) -> None:
    """From the node's service being up (its log says so) to a running browser resolving it;
    the process's own start (imports) is printed too."""
    _, nodes = observer
    _no_coordinator_token(tmp_path)
    spawned = time.time()
    node = await _node(cli, lan.hosts["b"], "b", "--coordinator", f"{lan.observer_ip}:1")
    seen_at = await eventually(lambda: _seen_at(nodes.seen.values(), "b"), timeout=15)
    # The node logs it just after it starts advertising: the browser may see it first.
    serving_at = await eventually(lambda: _logged_at(node, "serving on port"), timeout=15)
    since_serving = seen_at - serving_at
    publish(
        f"discovery: a running browser saw a new node {since_serving:.2f} s after its service"
        f" was up ({seen_at - spawned:.2f} s after its process was started)"
    )
    assert since_serving < SEEN_WITHIN, node.output()

    # Withdrawn on shutdown: the browser drops it at once (a goodbye, not an expiry).
    await node.stop()
    await eventually(lambda: _absent(nodes.seen.values(), "b"), timeout=3)


async def test_a_real_mdns_peer_lists_the_nodes_and_their_txt(
    lan: Lan,
    avahi: AvahiPeer,
    cli: CliProcesses,
    observer: tuple[Browser[CoordinatorAd], Browser[NodeAd]],
    tmp_path: Path,
) -> None:
    _, nodes = observer
    _no_coordinator_token(tmp_path)
    for host, node_id in ((lan.hosts["b"], "b"), (lan.hosts["c"], "c")):
        await _node(cli, host, node_id, "--label", "gpu=true", "--label", "odd=x,y=z")
    # Two node processes start (and import) first: on a loaded machine that takes a while.
    await eventually(lambda: _all_seen(nodes.seen.values(), {"b", "c"}), timeout=30)

    async def listed() -> dict[str, dict[str, str]]:
        done = await run_tool(
            [*avahi.exec_prefix(), "avahi-browse", "-rpt", "_shoal-node._tcp"], timeout=15
        )
        assert done.returncode == 0, done
        found = _avahi_resolved(done.stdout)
        assert {"b", "c"} <= set(found), done.stdout
        return found

    found = await eventually(listed, timeout=15)
    publish(f"discovery: avahi-browse -rpt _shoal-node._tcp resolved b with TXT {found['b']}")
    for node_id in ("b", "c"):
        txt = found[node_id]
        assert txt["id"] == node_id
        assert txt["cluster"] == "default" and txt["txtvers"] == "1"
        assert {"shell", "python"} <= set(txt["executors"].split(","))
        # `,` and `=` inside a label are escaped, so the k=v list stays parseable.
        assert txt["labels"] == f"gpu=true,host={node_id},odd=x%2Cy%3Dz"
        assert not {"token", "secret"} & {key.lower() for key in txt}


async def test_the_coordinator_lists_discovered_nodes_and_discover_shows_the_lan(
    lan: Lan, cli: CliProcesses, tmp_path: Path
) -> None:
    a, b, c, p = (lan.hosts[h] for h in "abcp")
    data_dir = tmp_path / "data"
    await _coordinator(cli, a, data_dir)
    await _node(cli, b, "b")
    # Advertised for the cluster but never joined: its coordinator address leads nowhere.
    await _node(cli, c, "stray", "--coordinator", f"{lan.observer_ip}:1")
    await _node(cli, c, "elsewhere", "--cluster", "other")

    async with _client(a, data_dir) as client:

        async def listed() -> dict[str, admin_pb2.NodeStatus]:
            nodes = {n.info.node_id: n for n in await client.nodes()}
            assert set(nodes) == {"b", "stray"}, nodes  # not another cluster's nodes
            assert nodes["b"].connected
            assert not nodes["stray"].connected
            assert nodes["stray"].health == admin_pb2.NODE_HEALTH_SERVING
            return nodes

        nodes = await eventually(listed, timeout=15)
        assert nodes["stray"].address.startswith(f"{c.ip}:")
        assert list(nodes["stray"].info.executors)

    table = await run_tool([SHOAL, "nodes", "-c", f"{a.ip}:{PORT}"], timeout=20)
    assert table.returncode == 0, table
    assert "not joined" in table.stdout and "SERVING" in table.stdout, table.stdout

    done = await run_tool([*p.exec_prefix(), SHOAL, "discover", "--json"], timeout=20)
    assert done.returncode == 0, done
    found = json.loads(done.stdout)
    publish(f"discovery: shoal discover --json found {_summary(found)}")
    (coordinator,) = found["coordinators"]
    assert coordinator["address"] == f"{a.ip}:{PORT}"
    assert (coordinator["cluster"], coordinator["auth"], coordinator["health"]) == (
        "default",
        True,
        "SERVING",
    )
    by_id = {n["node_id"]: n for n in found["nodes"]}
    assert set(by_id) == {"b", "stray", "elsewhere"}
    assert by_id["elsewhere"]["cluster"] == "other"
    assert all(n["health"] == "SERVING" for n in by_id.values()), by_id
    assert by_id["b"]["labels"] == {"host": "b"}


async def test_a_node_follows_its_coordinator_when_it_moves(
    lan: Lan, cli: CliProcesses, tmp_path: Path
) -> None:
    a, b, p = lan.hosts["a"], lan.hosts["b"], lan.hosts["p"]
    data_dir = tmp_path / "data"
    first = await _coordinator(cli, a, data_dir)
    await _node(cli, b, "b")
    async with _client(a, data_dir) as client:
        await eventually(lambda: _has(_joined(client), "b"), timeout=10)

    await first.stop()  # it withdraws its advertisement
    await _coordinator(cli, p, data_dir)  # same data: the same admin token, elsewhere
    moved = time.monotonic()
    async with _client(p, data_dir) as client:
        await eventually(lambda: _has(_joined(client), "b"), timeout=15)
    publish(
        f"discovery: node b joined the moved coordinator {time.monotonic() - moved:.2f} s after"
    )


async def test_an_adopting_coordinator_dials_discovered_nodes_and_again_after_a_restart(
    lan: Lan, cli: CliProcesses, tmp_path: Path
) -> None:
    """Nodes that dial nobody (--standalone) are adopted: the coordinator, which does not
    advertise itself here, finds them by mDNS and dials their Node.Attach."""
    a, b = lan.hosts["a"], lan.hosts["b"]
    data_dir = tmp_path / "data"
    await _coordinator(cli, a, data_dir, "--adopt", "--advertise", "off")
    async with _client(a, data_dir) as client:
        # An adopting coordinator proves itself only for a node's own token.
        made = await client.create_token(
            admin_pb2.CreateTokenRequest(name="b", role=admin_pb2.ROLE_NODE)
        )
    token_file = tmp_path / "b.token"
    token_file.write_text(made.token)
    node = await _node(cli, b, "b", "--standalone", "--token-file", str(token_file))
    started = time.monotonic()
    async with _client(a, data_dir) as client:

        async def adopted() -> admin_pb2.NodeStatus:
            status = next((n for n in await client.nodes() if n.info.node_id == "b"), None)
            assert status is not None and status.connected and status.adopted, status
            return status

        try:
            await eventually(adopted, timeout=15)
        except AssertionError as err:
            raise AssertionError(cli.logs()) from err
        joined = time.monotonic() - started
        await _runs_on(client, "b")

        await node.kill()  # kill -9: the coordinator loses the session, the node's ad lingers
        # Back, on a new port: a new advertisement.
        await _node(cli, b, "b", "--standalone", "--token-file", str(token_file))
        restarted = time.monotonic()
        try:
            await eventually(adopted, timeout=20)
        except AssertionError as err:
            raise AssertionError(cli.logs()) from err
        rejoined = time.monotonic() - restarted
        await _runs_on(client, "b")
    publish(
        f"adopt: node b adopted {joined:.2f} s after its start; after kill -9 and a restart,"
        f" adopted again {rejoined:.2f} s after"
    )


async def _runs_on(client: AsyncClient, node_id: str) -> None:
    task = await client.submit(shell("echo $((6 * 7))", labels={"host": node_id}))
    done = await asyncio.wait_for(client.wait(task.id), 20)
    assert done.state == task_pb2.TASK_STATE_SUCCEEDED, done
    assert (done.node_id, done.result.stdout) == (node_id, "42\n")


# -- helpers -------------------------------------------------------------------------------


def _only(ads: Iterable[CoordinatorAd]) -> CoordinatorAd:
    found = list(ads)
    assert len(found) == 1, found
    return found[0]


def _seen_at(ads: Iterable[NodeAd], node_id: str) -> float:
    """Now (time.time()), if `node_id` is among `ads`."""
    assert node_id in {ad.node_id for ad in ads}
    return time.time()


def _absent(ads: Iterable[NodeAd], node_id: str) -> None:
    assert node_id not in {ad.node_id for ad in ads}


def _all_seen(ads: Iterable[NodeAd], node_ids: set[str]) -> None:
    assert node_ids <= {ad.node_id for ad in ads}


async def _has(names: Awaitable[set[str]], name: str) -> None:
    assert name in await names


def _logged_at(proc: CliProcess, text: str) -> float:
    """When (time.time()) `proc` first logged a line containing `text`."""
    for line in proc.output().splitlines():
        if text in line:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            return stamp.timestamp()
    raise AssertionError(f"{proc.name} never logged {text!r}:\n{proc.output()}")


def _avahi_resolved(output: str) -> dict[str, dict[str, str]]:
    """TXT records of the services `avahi-browse -rpt` resolved, by their `id`."""
    found: dict[str, dict[str, str]] = {}
    for line in output.splitlines():
        fields = line.split(";", 9)
        if fields[0] != "=" or len(fields) < 10:
            continue
        txt = dict(item.partition("=")[::2] for item in shlex.split(fields[9]))
        found[txt.get("id", fields[3])] = txt
    return found


def _summary(found: dict[str, list[dict[str, str]]]) -> str:
    parts = [f"coordinator {c['address']} ({c['health']})" for c in found["coordinators"]]
    parts += [f"node {n['node_id']} ({n['cluster']}, {n['health']})" for n in found["nodes"]]
    return ", ".join(parts)
