"""`shoal token create --role node` prints a join line, and `shoal node --join` takes it."""

from __future__ import annotations

import asyncio
import shlex
from pathlib import Path

import pytest

from shoal import AsyncClient, certs, shell
from shoal.config import ADMIN_TOKEN_FILE, CoordinatorSettings
from shoal.coordinator.server import CoordinatorServer
from shoal.join import JoinLine, ca_fingerprint
from shoal.v1 import task_pb2

from .harness import CliProcesses, Completed, Mesh, eventually

pytestmark = pytest.mark.timeout(90)


async def shoal_(cli: CliProcesses, *args: str) -> Completed:
    run = await cli.start(*args, pipe=True)
    out, err = await asyncio.wait_for(run.proc.communicate(), 60)
    assert run.proc.returncode is not None
    return Completed(run.proc.returncode, out.decode(), err.decode())


def join_line(stderr: str) -> list[str]:
    """The `shoal node --join ...` line that `token create` printed, as argv."""
    (line,) = [s.strip() for s in stderr.splitlines() if s.strip().startswith("shoal node")]
    return shlex.split(line)


async def test_a_node_joins_by_the_line_its_token_printed(
    mesh: Mesh, cli: CliProcesses, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SHOAL_TOKEN_FILE", str(mesh.data_dir / ADMIN_TOKEN_FILE))
    made = await shoal_(cli, "token", "create", "joiner", "--role", "node", "-c", mesh.address)
    assert made.returncode == 0, made
    argv = join_line(made.stderr)
    assert argv[:3] == ["shoal", "node", "--join"]
    assert JoinLine.parse(argv[3]) == JoinLine(mesh.address, made.stdout.strip())

    # Only the line gives the node its token: no token file, no local admin token.
    monkeypatch.delenv("SHOAL_NODE_TOKEN_FILE")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "empty"))
    await cli.start(*argv[1:], "--node-id", "joiner", "--slots", "1", "-l", "joined=yes")

    async def joined() -> None:
        assert "joiner" in {n.info.node_id for n in await mesh.client.nodes()}, cli.logs()

    await eventually(joined, timeout=30)
    task = await mesh.client.submit(shell("echo joined", labels={"joined": "yes"}))
    done = await mesh.client.wait(task.id)
    assert done.state == task_pb2.TASK_STATE_SUCCEEDED, (done, cli.logs())
    assert (done.node_id, done.result.stdout) == ("joiner", "joined\n")


async def test_with_tls_the_line_pins_the_ca_and_a_node_given_another_stops(
    mesh: Mesh, cli: CliProcesses, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ca = certs.init_ca(tmp_path / "ca")
    other = certs.init_ca(tmp_path / "other")
    monkeypatch.setenv("SHOAL_TOKEN_FILE", str(mesh.data_dir / ADMIN_TOKEN_FILE))
    # The line is made for the address new nodes dial; this client reaches the mesh in clear.
    made = await shoal_(
        cli, "token", "create", "tls-node", "--role", "node", "-c", mesh.address,
        "--join-address", "coord.example:7070",
    )  # fmt: skip
    assert made.returncode == 0, made
    assert "ca=" not in made.stderr  # no TLS on the client: nothing to pin

    pinned = JoinLine("coord.example:7070", made.stdout.strip(), ca_fingerprint(ca.read_bytes()))
    refused = await shoal_(cli, "node", "--join", pinned.url(), "--tls-ca", str(other))
    assert refused.returncode == 1
    assert f"is not the CA the join line pins ({pinned.ca})" in refused.stderr
    # Without a CA file, the node fetches the pinned CA from that address: none answers there.
    unpinned = await shoal_(cli, "node", "--join", pinned.url())
    assert unpinned.returncode == 1
    assert "cannot reach coord.example:7070 to fetch its CA" in unpinned.stderr


async def test_with_tls_a_node_given_only_the_line_fetches_the_pinned_ca_and_joins(
    cli: CliProcesses, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ca = certs.init_ca(tmp_path / "pki")
    cert, key = certs.issue(tmp_path / "pki", "coordinator", hosts=["localhost", "127.0.0.1"])
    coordinator = CoordinatorServer(
        CoordinatorSettings(
            listen="127.0.0.1:0", data_dir=tmp_path / "data", tls_cert=cert, tls_key=key
        )
    )
    await coordinator.start()
    try:
        monkeypatch.setenv("SHOAL_TOKEN_FILE", str(coordinator.admin_token_path))
        monkeypatch.setenv("SHOAL_TLS_CA", str(ca))
        made = await shoal_(
            cli, "token", "create", "pinned", "--role", "node", "-c", coordinator.address
        )
        assert made.returncode == 0, made
        argv = join_line(made.stderr)
        assert JoinLine.parse(argv[3]).ca == ca_fingerprint(ca.read_bytes())

        # The new machine has the line and nothing else: no CA file, no token file.
        for name in ("SHOAL_TLS_CA", "SHOAL_TOKEN_FILE", "SHOAL_NODE_TOKEN_FILE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "new-machine"))
        await cli.start(*argv[1:], "--node-id", "pinned", "--slots", "1", "-l", "pin=yes")
        token = coordinator.admin_token_path.read_text().strip()
        async with AsyncClient(coordinator.address, token=token, tls_ca=ca) as client:

            async def joined() -> None:
                assert "pinned" in {n.info.node_id for n in await client.nodes()}, cli.logs()

            await eventually(joined, timeout=30)
            task = await client.submit(shell("echo pinned", labels={"pin": "yes"}))
            done = await client.wait(task.id)
        assert (done.state, done.node_id) == (task_pb2.TASK_STATE_SUCCEEDED, "pinned"), done

        # A line pinning another CA finds no such certificate in the chain: one line, exit 1.
        other = certs.init_ca(tmp_path / "other")
        wrong = JoinLine(coordinator.address, "t", ca_fingerprint(other.read_bytes()))
        refused = await shoal_(cli, "node", "--join", wrong.url())
        assert refused.returncode == 1, refused
        assert f"sends no certificate {wrong.ca} in its TLS chain" in refused.stderr
    finally:
        await coordinator.stop()


async def test_a_bad_join_line_stops_the_node_with_one_line(cli: CliProcesses) -> None:
    bad = await shoal_(cli, "node", "--join", "shoal://coord:7070?token=t&admin=1")
    assert bad.returncode == 1
    assert bad.stderr.strip() == "error: unknown join line fields: admin"
