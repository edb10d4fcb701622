"""Waiting tasks say why, and a task no connected node could run fails soon (issue 18)."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from pathlib import Path

import pytest

from shoal import shell
from shoal.errors import TaskFailed

from .harness import BIN, CliProcesses, Mesh, eventually, free_port, run_tool

pytestmark = pytest.mark.timeout(60)

NO_NODE = "no connected node can run it: none matches label gpu=h100"


@pytest.fixture
def as_user(mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The `shoal` command, reaching the mesh as its admin would."""
    monkeypatch.setenv("SHOAL_TOKEN", mesh.token)
    monkeypatch.setenv("SHOAL_COORDINATOR", mesh.address)
    monkeypatch.setenv("COLUMNS", "250")
    return [str(BIN / "shoal")]


async def test_call_tool_of_a_tool_no_node_offers_fails_soon_saying_why(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="shoal"), pytest.raises(TaskFailed) as failed:
        await mesh.client.call_tool("nonexistent")
    assert failed.value.task.result.error == (
        "FAILED_PRECONDITION: no connected node can run it: none offers tool 'nonexistent'"
    )
    said = [r.getMessage() for r in caplog.records if r.name == "shoal"]
    assert any("waits: no node offers tool 'nonexistent'; fails at" in m for m in said), said


async def test_run_submit_and_wait_say_why_a_task_waits(mesh: Mesh, as_user: list[str]) -> None:
    patient = await mesh.client.submit(
        shell(
            "true", labels={"gpu": "h100"}, wait_for_node=True, queue_timeout=timedelta(seconds=9)
        )
    )
    run, submitted, waited = await asyncio.gather(
        run_tool([*as_user, "run", "-l", "gpu=h100", "--", "true"]),
        run_tool([*as_user, "submit", "--wait", "-l", "gpu=h100", "--", "true"]),
        run_tool([*as_user, "wait", patient.id]),
    )

    assert run.returncode == 1, run
    assert "waiting: no node matches label gpu=h100; fails at" in run.stderr, run.stderr
    assert f"FAILED: FAILED_PRECONDITION: {NO_NODE}" in run.stderr, run.stderr

    assert "waiting: no node matches label gpu=h100; fails at" in submitted.stderr, submitted
    assert submitted.stdout.split()[1:] == ["FAILED"], submitted  # its id, and how it ended

    assert waited.returncode == 124, waited  # its queue timeout: it waited for a node
    assert "waiting: no node matches label gpu=h100\n" in waited.stderr, waited.stderr
    assert f"{patient.id} TIMED_OUT" in waited.stdout, waited.stdout
    assert "not started within its queue timeout" in waited.stderr, waited.stderr


async def test_shoal_up_shows_its_guard_and_says_when_it_throttles(
    cli: CliProcesses, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Any machine uses more than 0.01% of its memory: the local node is throttled at once.
    monkeypatch.setenv("SHOAL_NODE_GUARD", "true")
    monkeypatch.setenv("SHOAL_NODE_GUARD_MEMORY_PERCENT", "0.01")
    monkeypatch.setenv("SHOAL_NODE_GUARD_BUSY_AFTER", "PT0S")
    monkeypatch.setenv("COLUMNS", "250")
    address = f"127.0.0.1:{free_port()}"
    up = await cli.start("up", "--listen", address, "--data-dir", str(tmp_path / "data"), name="up")

    def throttled() -> None:
        out = up.output()
        assert "guard       on: while other programs use over 70% CPU or 0.01% memory," in out, out
        assert "the local node takes only NORMAL priority or higher" in out
        assert "local node throttled: the machine is busy (memory " in out, out
        assert "only NORMAL priority or higher runs until it is calm" in out, out

    await eventually(throttled, timeout=30)
    low = await cli.start("run", "-c", address, "--priority", "low", "--", "true", name="run")

    def says_why() -> None:
        assert "takes only NORMAL or higher priority now: its machine is busy" in low.output()

    await eventually(says_why, timeout=30)
