"""Progress from inside tasks (a function, a shell task) to Watch, Get and the CLI; `shoal logs`
and `shoal artifacts`."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

import shoal
from shoal.config import ADMIN_TOKEN_FILE
from shoal.v1 import task_pb2
from tests.contract.loopback import LoopbackHttp

from . import functions_module as fm
from .harness import BIN, CliProcesses, Mesh, MeshFactory, eventually, run_tool

MODULE = "tests.integration.functions_module"

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def mesh(mesh_factory: MeshFactory) -> Mesh:
    return await mesh_factory(slots=2, imports=[MODULE])


async def _progress_events(mesh: Mesh, task: task_pb2.Task) -> list[task_pb2.Event]:
    seen: list[task_pb2.Event] = []
    async for event in mesh.client.watch(since=task.created_seq - 1, task_ids=[task.id]):
        if event.HasField("progress"):
            seen.append(event)
        if event.state == task_pb2.TASK_STATE_SUCCEEDED:
            return seen
    return seen


async def test_a_function_reports_progress_to_watch_get_and_the_cli(
    mesh: Mesh, tmp_path: Path
) -> None:
    gate = fm.Gate(tmp_path / "gate")
    handle = await fm.with_progress.async_submit(mesh.client, 4, str(gate))
    task = await handle.task()
    watching = asyncio.create_task(_progress_events(mesh, task))

    async def reported() -> task_pb2.Task:
        t = await handle.task()
        assert t.progress.fraction == 1.0 and t.progress.message == "4 of 4"
        return t

    running = await eventually(reported, timeout=30)
    assert running.state == task_pb2.TASK_STATE_RUNNING
    gate.open()
    assert await handle.result() == 4
    events = await asyncio.wait_for(watching, 30)
    fractions = [e.progress.fraction for e in events]
    assert fractions and fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert events[-1].progress.message == "4 of 4"
    assert all(e.state == task_pb2.TASK_STATE_RUNNING for e in events)


async def test_a_shell_task_reports_progress_on_its_descriptor(
    mesh: Mesh, cli: CliProcesses, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SHOAL_TOKEN_FILE", str(mesh.data_dir / ADMIN_TOKEN_FILE))
    gate = fm.Gate(tmp_path / "gate")
    script = (
        "sleep 1.2\n"
        'echo "0.25 a quarter" >"$SHOAL_PROGRESS"\n'
        'echo "not a number" >"$SHOAL_PROGRESS"\n'
        'echo "NaN bad" >"$SHOAL_PROGRESS"\n'
        f'"{sys.executable}" -m shoal progress nan bad 2>/dev/null || echo refused\n'
        "sleep 0.2\n"
        'shoal progress 7 "over the top, clamped"\n'  # found though not on the node's PATH
        f'flock -s "{gate}" true\n'
        "echo done\n"
    )
    task = await mesh.client.submit(shoal.shell(script, env={"PATH": "/usr/bin:/bin"}))
    watching = asyncio.create_task(_progress_events(mesh, task))

    async def reported() -> task_pb2.Task:
        t = await mesh.client.get(task.id)
        assert t.progress.fraction == 1.0, t.progress
        return t

    await eventually(reported, timeout=30)
    shown = await run_tool([str(BIN / "shoal"), "get", task.id, "-c", mesh.address], timeout=30)
    assert "100% over the top, clamped" in " ".join(shown.stdout.split()), shown
    gate.open()
    events = await asyncio.wait_for(watching, 30)
    assert [(e.progress.fraction, e.progress.message) for e in events] == [
        (0.25, "a quarter"),
        (1.0, "over the top, clamped"),
    ]
    assert events[0].progress.HasField("estimated_end")

    logs = await run_tool([str(BIN / "shoal"), "logs", task.id, "-c", mesh.address])
    assert logs.stdout == "refused\ndone\n", logs


async def test_logs_follow_a_running_task_and_artifacts_download(
    mesh: Mesh, cli: CliProcesses, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SHOAL_TOKEN_FILE", str(mesh.data_dir / ADMIN_TOKEN_FILE))
    gate = fm.Gate(tmp_path / "gate")
    script = f'echo first; flock -s "{gate}" true; echo second >&2'
    task = await mesh.client.submit(shoal.shell(script))
    follow = await cli.start("logs", "-f", task.id, "-c", mesh.address, pipe=True)
    gate.open()  # followed live or printed whole once ended: the same bytes
    out, err = await asyncio.wait_for(follow.proc.communicate(), 60)
    assert follow.proc.returncode == 0
    assert out.decode() == "first\n" and err.decode() == "second\n"


async def test_artifacts_are_listed_and_saved(
    mesh_factory: MeshFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    async with LoopbackHttp() as server:
        mesh = await mesh_factory(slots=1, http_allow_hosts=[f"127.0.0.1:{server.port}"])
        monkeypatch.setenv("SHOAL_TOKEN_FILE", str(mesh.data_dir / ADMIN_TOKEN_FILE))
        spec = task_pb2.TaskSpec(http=task_pb2.HttpSpec(url=server.url("/json")))
        task = await mesh.client.wait((await mesh.client.submit(spec)).id)
    assert task.state == task_pb2.TASK_STATE_SUCCEEDED, task.result
    shoal_cli = [str(BIN / "shoal"), "artifacts", task.id]
    listed = await run_tool([*shoal_cli, "-c", mesh.address])
    assert listed.returncode == 0, listed
    assert "body" in listed.stdout and "application/json" in listed.stdout
    out = tmp_path / "out"
    out.mkdir()
    saved = out / "body.json"
    done = await run_tool([*shoal_cli, "body", "-o", str(saved), "-c", mesh.address])
    assert done.returncode == 0, done
    assert json.loads(saved.read_bytes()) == {"greeting": "hello", "n": 3}
    printed = await run_tool([*shoal_cli, "body", "-o", "-", "-c", mesh.address])
    assert json.loads(printed.stdout) == {"greeting": "hello", "n": 3}
    # A name that is not one of the task's artifacts (a path, say) is refused; nothing written.
    hostile = await run_tool([*shoal_cli, "../x", "-o", str(out / "x"), "-c", mesh.address])
    assert hostile.returncode == 1 and "no artifact '../x'" in hostile.stderr, hostile
    assert "it has: body" in hostile.stderr
    assert sorted(p.name for p in out.iterdir()) == ["body.json"]
    assert not (tmp_path / "x").exists()
    nowhere = await run_tool([*shoal_cli, "body", "-o", str(out / "no" / "x"), "-c", mesh.address])
    assert nowhere.returncode == 1 and "cannot save to" in nowhere.stderr, nowhere
    assert "Traceback" not in nowhere.stderr
