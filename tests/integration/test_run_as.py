"""`run_as`: a node run as root runs shell tasks as an unprivileged user, who cannot read
Shoal's own files, in a working directory of the task's own. (These tests run as root, as the
node of a machine does.)"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from shoal import AsyncClient, shell
from shoal.config import ADMIN_TOKEN_FILE, CoordinatorSettings, NodeSettings
from shoal.coordinator.server import CoordinatorServer
from shoal.node.agent import NodeAgent
from shoal.node.executors.taskuser import TASK_UID_BASE
from shoal.v1 import task_pb2

from .harness import STARTUP, eventually, process_gone

pytestmark = pytest.mark.timeout(60)

WAIT = timedelta(seconds=20)


@contextlib.asynccontextmanager
async def open_mesh(root: Path, **node_settings: Any) -> AsyncIterator[tuple[AsyncClient, Path]]:
    """A coordinator whose data dir is in `root` and a node whose token file is `root`/node.token
    (0600, as an operator writes it); yields a client and the node's token file."""
    server = CoordinatorServer(CoordinatorSettings(listen="127.0.0.1:0", data_dir=root / "data"))
    await server.start()
    try:
        token = server.admin_token_path.read_text().strip()
        token_file = root / "node.token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        node = NodeAgent(
            NodeSettings(
                coordinator=server.address,
                listen="127.0.0.1:0",
                token_file=token_file,
                slots=2,
                **node_settings,
            )
        )
        await node.start()
        try:
            await asyncio.wait_for(node.connected.wait(), STARTUP)
            client = AsyncClient(server.address, token=token)
            try:
                yield client, token_file
            finally:
                await client.close()
        finally:
            await asyncio.wait_for(node.stop(), 20)
    finally:
        await asyncio.wait_for(server.stop(), 20)


@pytest.fixture
def root() -> Iterator[Path]:
    """A directory any user may enter (pytest's tmp_path is private to root): there, only the
    modes Shoal gives its own files keep a task out."""
    path = Path(tempfile.mkdtemp(prefix="shoal-run-as-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_a_task_runs_as_a_uid_of_its_own_and_cannot_read_shoals_files(root: Path) -> None:
    async with open_mesh(root, run_as="auto") as (client, token_file):
        data = root / "data"
        script = (
            "id -u; id -g; id -G; "
            f"cat {token_file} || echo no-node-token; "
            f"cat {data / ADMIN_TOKEN_FILE} || echo no-admin-token; "
            f"cat {data / 'shoal.db'} > /dev/null || echo no-store; "
            f"ls {data} || echo no-data-dir"
        )
        done = await client.wait((await client.submit(shell(script))).id, timeout=WAIT)

    assert done.state == task_pb2.TASK_STATE_SUCCEEDED, done.result
    token = token_file.read_text().strip()
    lines = done.result.stdout.splitlines()
    uid = int(lines[0])
    assert uid >= TASK_UID_BASE and lines[1:3] == [str(uid), str(uid)]  # no root group
    assert lines[3:] == ["no-node-token", "no-admin-token", "no-store", "no-data-dir"]
    assert token not in done.result.stdout
    assert done.result.stderr.count("Permission denied") == 4, done.result.stderr


async def test_a_task_of_another_user_works_in_a_directory_of_its_own(root: Path) -> None:
    user = pwd.getpwnam("nobody")
    async with open_mesh(root, run_as=f"{user.pw_uid}:{user.pw_gid}", workdir=root) as (client, _):
        script = 'pwd; echo "$HOME"; echo written > out.txt; cat out.txt; ls -ld . | cut -c1-10'
        done = await client.wait((await client.submit(shell(script))).id, timeout=WAIT)
        # Another task gets another directory: nothing of the first is left.
        second = await client.wait((await client.submit(shell(["ls", "-A"]))).id, timeout=WAIT)

    assert done.state == task_pb2.TASK_STATE_SUCCEEDED, done.result
    cwd, home, written, mode = done.result.stdout.splitlines()
    assert Path(cwd).parent == root and Path(cwd).name.startswith("shoal-task-")
    assert (home, written, mode) == (cwd, "written", "drwx------")
    assert second.state == task_pb2.TASK_STATE_SUCCEEDED, second.result
    assert second.result.stdout == ""
    # Each was removed once its task ended.
    left = await asyncio.to_thread(lambda: [p for p in root.iterdir() if p.name != "data"])
    assert left == [root / "node.token"]


async def test_what_the_task_chooses_takes_effect_only_once_it_is_its_own_user(
    root: Path,
) -> None:
    """setpriv runs as root until it switches: the task's loader variables (LD_PRELOAD would
    load its code into a root process) and its directory apply only after the switch."""
    private = root / "private"
    private.mkdir(mode=0o700)
    async with open_mesh(root, run_as="auto") as (client, _):
        traced = shell(["/usr/bin/true"], env={"LD_DEBUG": "files", "TMPDIR": "/tmp"})
        loaded = await client.wait((await client.submit(traced)).id, timeout=WAIT)
        elsewhere = await client.wait(
            (await client.submit(shell(["pwd"], cwd="/tmp"))).id, timeout=WAIT
        )
        shut_out = await client.wait(
            (await client.submit(shell(["pwd"], cwd=str(private)))).id, timeout=WAIT
        )
        odd = await client.wait(
            (await client.submit(shell(["/no/such=dir/cmd"], env={"LD_DEBUG": "x"}))).id,
            timeout=WAIT,
        )

    assert loaded.state == task_pb2.TASK_STATE_SUCCEEDED, loaded.result
    assert "needed by /usr/bin/true" in loaded.result.stderr  # the task's own program: traced
    assert "setpriv" not in loaded.result.stderr  # the root process that switched: not
    assert elsewhere.state == task_pb2.TASK_STATE_SUCCEEDED, elsewhere.result
    assert elsewhere.result.stdout == "/tmp\n"
    # A directory only root may enter is entered by the task's user: it cannot.
    assert shut_out.state == task_pb2.TASK_STATE_FAILED
    assert "Permission denied" in shut_out.result.stderr
    assert odd.state == task_pb2.TASK_STATE_FAILED and "holds '='" in odd.result.error


async def test_run_as_node_keeps_the_nodes_own_user(root: Path) -> None:
    async with open_mesh(root, run_as="node") as (client, token_file):
        done = await client.wait(
            (await client.submit(shell(f"id -u; cat {token_file}"))).id, timeout=WAIT
        )

    assert done.state == task_pb2.TASK_STATE_SUCCEEDED, done.result
    assert done.result.stdout.splitlines() == [str(os.geteuid()), token_file.read_text().strip()]


async def test_running_tasks_cannot_read_each_others_environment_and_leave_nothing_running(
    root: Path,
) -> None:
    secret = "s3cr3t-" + os.urandom(8).hex()
    shared = root / "shared"  # where tasks of any user may write (as /tmp)
    shared.mkdir(mode=0o1777)
    shared.chmod(0o1777)
    async with open_mesh(root, run_as="auto", secrets={"db": secret}) as (client, _):
        # One task holds a secret in its environment while another looks for it everywhere it
        # can; the first also leaves a process of its own behind, out of its process group.
        holder = shell(f"setsid sleep 300 & echo $! > {shared}/leftover; sleep 30")
        holder.secrets.add(name="db", env="DB_PASSWORD")
        held = await client.submit(holder)
        leftover = await eventually(
            lambda: int((shared / "leftover").read_text()), retry_on=(OSError, ValueError)
        )
        snoop = shell(
            "for f in /proc/[0-9]*/environ; do cat $f 2>/dev/null | tr '\\0' '\\n'; done"
            " | grep -c DB_PASSWORD || true"
        )
        looked = await client.wait((await client.submit(snoop)).id, timeout=WAIT)
        await client.cancel(held.id)
        await client.wait(held.id, timeout=WAIT)

    assert looked.state == task_pb2.TASK_STATE_SUCCEEDED, looked.result
    assert looked.result.stdout.strip() == "0"
    assert secret not in looked.result.stdout
    await eventually(lambda: process_gone(leftover))
