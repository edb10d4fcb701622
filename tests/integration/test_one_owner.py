"""A second process never shares what a first one holds: a coordinator's data dir, its port,
its metrics port, a node's service port. It exits at once with one line naming the holder."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal import AsyncClient, shell

from .harness import CliProcess, CliProcesses, free_port, wait_serving
from .test_processes import communicate

pytestmark = pytest.mark.timeout(60)


async def refused(cli: CliProcesses, *args: str, logs: bool = False) -> str:
    """Run `shoal ARGS...`, which must exit 1 with one line on stderr (besides its log lines,
    with `logs`); returns that line."""
    second = await cli.start(*args, pipe=True)
    out, err = await communicate(second)
    assert second.proc.returncode == 1, (out, err)
    lines = [line for line in err.splitlines() if not (logs and line.startswith("20"))]
    assert len(lines) == 1, err  # one line, no traceback
    assert lines[0].startswith("error: "), err
    return lines[0]


async def still_serves(first: CliProcess, address: str) -> None:
    assert first.running
    async with AsyncClient(address) as client:
        assert (await client.submit(shell(["true"]))).id


async def test_a_second_coordinator_on_a_data_dir_in_use_exits(
    cli: CliProcesses, tmp_path: Path
) -> None:
    port, data_dir = free_port(), tmp_path / "data"
    first = await cli.coordinator(port, data_dir)

    line = await refused(
        cli, "coordinator", "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(data_dir)
    )

    assert f"{data_dir} is in use by pid {first.pid}" in line
    await still_serves(first, f"127.0.0.1:{port}")


async def test_a_second_coordinator_on_a_port_in_use_exits(
    cli: CliProcesses, tmp_path: Path
) -> None:
    port = free_port()
    first = await cli.coordinator(port, tmp_path / "data")

    line = await refused(
        cli, "coordinator", "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "b")
    )

    assert (
        line == f"error: cannot listen on 127.0.0.1:{port}: pid {first.pid} (shoal) listens there"
    )
    await still_serves(first, f"127.0.0.1:{port}")


async def test_a_second_coordinator_on_a_metrics_port_in_use_exits(
    cli: CliProcesses, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port, metrics = free_port(), f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("SHOAL_COORDINATOR_METRICS_LISTEN", metrics)
    first = await cli.coordinator(port, tmp_path / "data")

    line = await refused(
        cli,
        "coordinator",
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--data-dir",
        str(tmp_path / "b"),
    )

    assert line == f"error: cannot listen on {metrics}: pid {first.pid} (shoal) listens there"
    await still_serves(first, f"127.0.0.1:{port}")


async def test_a_second_node_on_a_service_port_in_use_exits(
    cli: CliProcesses, tmp_path: Path
) -> None:
    address, token = f"127.0.0.1:{free_port()}", tmp_path / "node.token"
    token.write_text("a-token-of-this-node")
    node = ("node", "--standalone", "--token-file", str(token), "--listen", address)
    first = await cli.start(*node, "--node-id", "first")
    await wait_serving(address)

    # A node logs what it found on its machine before it listens.
    line = await refused(cli, *node, "--node-id", "second", logs=True)

    assert line == f"error: cannot listen on {address}: pid {first.pid} (shoal) listens there"
    assert first.running
