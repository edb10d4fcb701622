"""The README's "On a network" recipe (CA, certificates, an mTLS coordinator, a node token, a
node) run as written, and a task run on that node.

The commands are read from the README's block, not copied here. Each runs with /bin/sh in one
directory, after the `export` lines above it; only three things are changed, so that it runs on
this machine: `coord.lan` becomes `localhost`, `0.0.0.0` becomes `127.0.0.1` and port 7070 a
free port. `shoal coordinator` and `shoal node` keep running in the background.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from shoal import AsyncClient, shell
from shoal.config import ADMIN_TOKEN_FILE, default_data_dir
from shoal.v1 import task_pb2

from .harness import BIN, STARTUP, CliProcess, CliProcesses, eventually, free_port

pytestmark = pytest.mark.timeout(90)

README = Path(__file__).resolve().parents[2] / "README.md"


def recipe() -> list[str]:
    """The commands of the first sh block under "## On a network", one per entry."""
    section = README.read_text().split("\n## On a network\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "no sh block in the README's On a network section"
    text = match.group(1).replace("\\\n", " ")
    return [line for line in text.splitlines() if line.strip()]


def on_this_machine(command: str, port: int) -> str:
    return (
        command.replace("coord.lan", "localhost")
        .replace("0.0.0.0", "127.0.0.1")
        .replace(":7070", f":{port}")
    )


def listening(coordinator: CliProcess) -> Callable[[], None]:
    def check() -> None:
        assert "coordinator listening on" in coordinator.output()

    return check


async def test_the_readme_mtls_recipe_runs_as_written(
    cli: CliProcesses, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The recipe's CLI finds the coordinator's admin token in the default data dir by itself.
    monkeypatch.delenv("SHOAL_TOKEN_FILE")
    monkeypatch.delenv("SHOAL_NODE_TOKEN_FILE")
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    work = tmp_path / "work"
    work.mkdir()
    port = free_port()
    exports: list[str] = []
    background: dict[str, CliProcess] = {}
    commands = recipe()
    assert [c.split()[:2] for c in commands if c.startswith("shoal ")] == [
        ["shoal", "certs"],
        ["shoal", "certs"],
        ["shoal", "certs"],
        ["shoal", "certs"],
        ["shoal", "coordinator"],
        ["shoal", "token"],
        ["shoal", "node"],
    ]
    for command in commands:
        line = on_this_machine(command, port)
        if line.startswith("export "):
            exports.append(line)
            continue
        script = "\n".join([*exports, line])
        kind = line.split()[1]
        if kind in ("coordinator", "node"):
            log = tmp_path / f"{kind}.log"
            with log.open("ab") as sink:
                proc = await asyncio.create_subprocess_exec(
                    "/bin/sh", "-c", "\n".join([*exports, "exec " + line]),
                    cwd=work, stdin=asyncio.subprocess.DEVNULL, stdout=sink,
                    stderr=asyncio.subprocess.STDOUT,
                )  # fmt: skip
            started = CliProcess(kind, shlex.split(line), proc, log)
            cli.started.append(started)  # stopped by the fixture
            background[kind] = started
            if kind == "coordinator":
                await eventually(listening(started), timeout=STARTUP)
            continue
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", script, cwd=work, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), STARTUP)
        assert proc.returncode == 0, f"{line}\n{out.decode()}{err.decode()}\n{cli.logs()}"

    certs = work / "certs"
    admin = (default_data_dir() / ADMIN_TOKEN_FILE).read_text().strip()
    async with AsyncClient(
        f"localhost:{port}",
        token=admin,
        tls_ca=certs / "ca.pem",
        tls_cert=certs / "admin.pem",
        tls_key=certs / "admin.key",
    ) as client:

        async def joined() -> None:
            nodes = await client.nodes()
            assert [(n.info.node_id, list(n.info.executors)) for n in nodes] == [
                ("gpu-1", ["shell"])
            ], cli.logs()

        await eventually(joined, timeout=STARTUP)
        submitted = await client.submit(shell("echo hello from gpu-1", labels={"gpu": "true"}))
        task = await client.wait(submitted.id, timeout=timedelta(seconds=30))
    assert task.state == task_pb2.TASK_STATE_SUCCEEDED, cli.logs()
    assert task.node_id == "gpu-1"
    assert task.result.stdout == "hello from gpu-1\n"
    assert background["node"].running and background["coordinator"].running
