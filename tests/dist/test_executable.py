"""The one-file executable where no Python is: a coordinator run from it, and a node in an
empty chroot (the executable, busybox for shell tasks, /proc, /dev/null and /dev/urandom)
that joins by the join line and runs a shell task and a third-party executor."""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shoal import AsyncClient, custom, shell
from shoal.config import ADMIN_TOKEN_FILE
from shoal.v1 import task_pb2
from tests.integration.harness import eventually, free_port

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]
BUSYBOX = next(p for p in ("/bin/busybox", "/usr/bin/busybox") if Path(p).exists())
COLD = 120.0  # seconds: each start unpacks the executable, slow on a busy machine


def empty_root(root: Path, executable: Path) -> None:
    """A root holding the executable, busybox's applets, the example package (installed with
    `pip install --target`, for SHOAL_PLUGIN_PATH) and mount points; no Python."""
    (root / "bin").mkdir(parents=True)
    shutil.copy2(executable, root / "bin/shoal")
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True)
    for applet in applets.stdout.split():
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    for d in ("proc", "dev", "tmp"):
        (root / d).mkdir()
    (root / "tmp").chmod(0o1777)
    for device in ("null", "urandom"):
        (root / "dev" / device).touch()
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps",
         "--target", str(root / "plugins"), str(REPO / "examples/shoal-example")],
        check=True,
    )  # fmt: skip
    assert not [p for p in root.rglob("python*") if p.is_file()], "a Python in the root"


def chrooted(root: Path, argv: list[str]) -> list[str]:
    """argv run as /bin/shoal ARGS inside `root`, in a mount namespace of its own."""
    mounts = " && ".join(
        [f"mount -t proc proc {root}/proc"]
        + [f"mount --bind /dev/{d} {root}/dev/{d}" for d in ("null", "urandom")]
    )
    environment = ["PATH=/bin", "HOME=/tmp", "TMPDIR=/tmp", "XDG_DATA_HOME=/tmp/data"]
    inner = shlex.join(
        [shutil.which("chroot") or "chroot", str(root), "env", "-i", *environment,
         "SHOAL_PLUGIN_PATH=/plugins", "/bin/shoal", *argv]
    )  # fmt: skip
    return [
        "unshare",
        "--mount",
        "--fork",
        "--kill-child=SIGTERM",
        "sh",
        "-c",
        f"{mounts} && exec {inner}",
    ]


async def run(
    argv: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    out, err = await asyncio.wait_for(proc.communicate(), COLD)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(argv, proc.returncode, out.decode(), err.decode())


@contextlib.asynccontextmanager
async def started(argv: list[str], log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """A process writing to `log`, stopped (SIGTERM, then SIGKILL) at the end."""
    with log.open("ab") as sink:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def test_a_node_in_an_empty_root_joins_by_its_line_and_runs_tasks(
    executable: Path, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    empty_root(root, executable)
    version = await run([str(executable), "--version"])
    assert version.stdout.startswith("shoal "), version

    # The coordinator runs from the executable too, on this machine.
    port, data = free_port(), tmp_path / "data"
    address = f"127.0.0.1:{port}"
    logs = {name: tmp_path / f"{name}.log" for name in ("coordinator", "node")}

    def told(name: str) -> str:
        return (
            "\n".join(
                f"--- {n}\n{p.read_text(errors='replace')[-3000:]}"
                for n, p in logs.items()
                if p.exists()
            )
            or name
        )

    coordinator_argv = [
        str(executable),
        "coordinator",
        "--listen",
        address,
        "--data-dir",
        str(data),
    ]
    async with started(coordinator_argv, logs["coordinator"]):
        admin_file = data / ADMIN_TOKEN_FILE

        def listening() -> None:
            assert admin_file.exists() and "listening on" in logs["coordinator"].read_text(), told(
                "coordinator"
            )

        await eventually(listening, timeout=COLD, interval=0.2)
        made = await run(
            [str(executable), "token", "create", "chrooted", "--role", "node", "-c", address],
            env={"PATH": "/bin", "SHOAL_TOKEN_FILE": str(admin_file), "HOME": str(tmp_path)},
        )
        assert made.returncode == 0, made
        (line,) = [
            s.strip() for s in made.stderr.splitlines() if s.strip().startswith("shoal node")
        ]
        join = shlex.split(line)[3]

        node_argv = chrooted(
            root, ["node", "--join", join, "--node-id", "chrooted", "--slots", "2"]
        )
        async with (
            started(node_argv, logs["node"]),
            AsyncClient(address, token=admin_file.read_text().strip()) as client,
        ):

            async def joined() -> None:
                nodes = {n.info.node_id: n for n in await client.nodes()}
                assert "chrooted" in nodes, told("node")
                assert "wordcount" in nodes["chrooted"].info.executors, nodes["chrooted"].info
                assert "python" not in nodes["chrooted"].info.executors

            await eventually(joined, timeout=COLD, interval=0.2)
            echoed = await client.submit(shell("echo from the chroot; ls /"))
            counted = await client.submit(custom("wordcount", {"text": "a b c"}))
            for task in (echoed, counted):
                done = await client.wait(task.id)
                assert done.state == task_pb2.TASK_STATE_SUCCEEDED, f"{done.result}\n{told('node')}"
                assert done.node_id == "chrooted"
            echo = (await client.get(echoed.id)).result.stdout
            assert echo.startswith("from the chroot\n") and "plugins" in echo, echo
