"""A coordinator process on a store whose files were damaged after a kill -9 (its WAL not yet
checkpointed): it refuses to start and says why, `shoal store check` shows it, and
`shoal store accept-loss` lets it go on in an epoch never used before."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from shoal import AsyncClient, shell
from shoal.coordinator.store.marks import Marks, found_marks, open_read_only, read_marks
from shoal.v1 import task_pb2

from .harness import STARTUP, CliProcesses, eventually, free_port
from .test_processes import communicate

pytestmark = pytest.mark.timeout(90)


def store_marks(data_dir: Path) -> Marks:
    """What the store holds now, read beside the running coordinator."""
    with contextlib.closing(open_read_only(data_dir / "shoal.db")) as conn:
        return found_marks(conn)


async def crashed_with_200_tasks(cli: CliProcesses, port: int, data_dir: Path) -> Marks:
    """A coordinator accepts 200 tasks and cancels 20, records that in its state file, and is
    killed (-9) with all of it still in its WAL; returns the marks it recorded."""
    coordinator = await cli.coordinator(port, data_dir)
    async with AsyncClient(f"127.0.0.1:{port}") as client:
        ids = await client.submit_batch([shell(["echo", str(i)]) for i in range(200)])
        for task_id in ids[:20]:
            assert (await client.cancel(task_id)).state == task_pb2.TASK_STATE_CANCELLED

    def recorded() -> Marks:
        marks = read_marks(data_dir / "shoal.state")
        assert marks is not None and marks == store_marks(data_dir)
        assert marks.finished > marks.accepted  # the outcomes came after the acceptances
        return marks

    marks = await eventually(recorded, timeout=STARTUP)
    assert await coordinator.kill() == -9
    assert (data_dir / "shoal.db-wal").stat().st_size > 0
    return marks


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _zero(path: Path) -> None:
    path.write_bytes(b"")


def _garble(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


DAMAGE: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "deleted wal": ("shoal.db-wal", Path.unlink, "its epoch is 0, not at least 1"),
    "deleted database": ("shoal.db", Path.unlink, "it is missing"),
    "zeroed database": ("shoal.db", _zero, "it is empty"),
    "truncated wal": ("shoal.db-wal", _truncate, "its last outcome is "),
    "garbage wal": ("shoal.db-wal", _garble, "its epoch is 0, not at least 1"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
async def test_a_damaged_store_is_refused_until_its_loss_is_accepted(
    cli: CliProcesses, tmp_path: Path, damage: str
) -> None:
    port, data_dir = free_port(), tmp_path / "data"
    before = await crashed_with_200_tasks(cli, port, data_dir)
    name, damage_file, lost = DAMAGE[damage]
    damage_file(data_dir / name)
    files = {
        p: p.read_bytes() for p in (data_dir / "shoal.db", data_dir / "shoal.db-wal") if p.exists()
    }

    refused = await cli.start(
        "coordinator", "--listen", f"127.0.0.1:{port}", "--data-dir", str(data_dir), pipe=True
    )
    out, err = await communicate(refused)
    assert refused.proc.returncode == 1, (out, err)
    lines = err.splitlines()
    assert len(lines) == 1, err  # one line, no traceback
    assert lines[0].startswith("error: refusing to start on the store"), err
    assert lost in lines[0]
    assert f"shoal store accept-loss --data-dir {data_dir}" in lines[0]
    # Nothing was written to what is left of it (SQLite may leave an empty -wal beside it).
    for path, content in files.items():
        assert path.read_bytes() == content, path
    assert read_marks(data_dir / "shoal.state") == before

    check = await cli.start("store", "check", "--data-dir", str(data_dir), pipe=True)
    out, err = await communicate(check)
    assert check.proc.returncode == 1, (out, err)
    assert lost in err

    accept = await cli.start(
        "store", "accept-loss", "--data-dir", str(data_dir), "--yes", pipe=True
    )
    out, err = await communicate(accept)
    assert accept.proc.returncode == 0, (out, err)

    await cli.coordinator(port, data_dir)
    after = read_marks(data_dir / "shoal.state")
    assert after is not None and after.epoch > before.epoch + 1  # accept-loss used one
    async with AsyncClient(f"127.0.0.1:{port}") as client:
        task = await client.submit(shell(["echo", "again"]))
    assert task.id


@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
async def test_a_healthy_store_restarts_with_every_task(
    cli: CliProcesses, tmp_path: Path, how: str
) -> None:
    port, data_dir = free_port(), tmp_path / "data"
    before = await crashed_with_200_tasks(cli, port, data_dir)
    coordinator = await cli.coordinator(port, data_dir)  # after a kill -9: the WAL is sound

    if how == "kill -9":
        assert await coordinator.kill() == -9
    else:
        assert await coordinator.stop() == 0
    await cli.coordinator(port, data_dir)
    async with AsyncClient(f"127.0.0.1:{port}") as client:
        listed = await client.list(limit=1000)
    assert len(listed) == 200
    assert sum(t.state == task_pb2.TASK_STATE_CANCELLED for t in listed) == 20
    after = read_marks(data_dir / "shoal.state")
    assert after is not None and after.epoch == before.epoch + 2
    assert (after.accepted, after.finished) == (before.accepted, before.finished)
