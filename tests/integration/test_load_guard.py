"""The node's resource guard for real: a CPU burner outside Shoal makes the machine busy."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import psutil
import pytest

from shoal import AsyncClient, shell
from shoal.v1 import admin_pb2, task_pb2

from .harness import BIN, MeshFactory, eventually, gate_script, process_gone, run_tool

pytestmark = [pytest.mark.timeout(90), pytest.mark.whole_machine]

WAIT = timedelta(seconds=20)
SETTLE = 20.0  # seconds: a deadline for the guard to see the machine busy, or calm again
BACKGROUND_TIMEOUT = 8.0  # seconds: the paused task is held past it, and must not time out

# Burners take up to 4 cores, at the lowest priority (nice 19): they use what nobody else
# does, so the node and the test run as fast as ever, and the foreground load is about all of
# those cores (BURNED, in percent of the machine) while they run. The node is busy over 80% of
# it and calm under 70%: other load on the machine up to that changes nothing. On 2 cores
# another test's processes are more than that: `make test` runs these tests on their own.
CORES = psutil.cpu_count() or 1
BURNERS = min(CORES, 4)
BURNED = 100.0 * BURNERS / CORES
GUARD = {
    "guard": True,
    "guard_cpu_percent": 0.8 * BURNED,
    "guard_memory_percent": 99.0,  # not a test of memory
    "guard_margin_percent": 0.1 * BURNED,
    "guard_busy_after": timedelta(seconds=1),
    "guard_calm_after": timedelta(seconds=2),
    "guard_min_priority": "high",
    "guard_policy": "pause",
}
# Started by a shell that exits at once, so it is nobody's child here: not the node's. It ends
# by itself after a minute, should the test's teardown never run.
_BURN = (
    "import os, time\nos.nice(19)\nend = time.monotonic() + 60\nwhile time.monotonic() < end: pass"
)


class CpuBurners:
    """Busy-loop processes outside the node's process tree; `stop` kills them all."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    async def start(self, count: int) -> None:
        for _ in range(count):
            proc = await asyncio.create_subprocess_exec(
                "/bin/sh",
                "-c",
                '"$0" -c "$1" </dev/null >/dev/null 2>&1 & echo $!',
                sys.executable,
                _BURN,
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await proc.communicate()
            self.pids.append(int(out))

    async def stop(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in self.pids:
            await eventually(functools.partial(process_gone, pid))
        self.pids.clear()


@pytest.fixture
async def burners() -> AsyncIterator[CpuBurners]:
    """CPU burners started outside Shoal; whatever happens, they are killed in teardown."""
    started = CpuBurners()
    try:
        yield started
    finally:
        await started.stop()


async def node_status(client: AsyncClient, node_id: str) -> admin_pb2.NodeStatus:
    return next(n for n in await client.nodes() if n.info.node_id == node_id)


async def follow(client: AsyncClient, events: list[task_pb2.Event]) -> None:
    async with contextlib.aclosing(client.watch()) as stream:
        async for event in stream:
            events.append(event)


def process_state(pid: int) -> str:
    """Its psutil status (`stopped` is state T), or `gone`."""
    try:
        return str(psutil.Process(pid).status())
    except psutil.NoSuchProcess:
        return "gone"


SIGSTOP_BIT = 1 << (signal.SIGSTOP - 1)


def stopped(pid: int) -> bool:
    """Whether `pid` is stopped, or has a SIGSTOP pending that stops it when it leaves the
    kernel (a process caught in an uninterruptible wait shows state D until then)."""
    if process_state(pid) == psutil.STATUS_STOPPED:
        return True
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    pending = 0
    for line in status.splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")):
            pending |= int(line.split()[1], 16)
    return bool(pending & SIGSTOP_BIT)


async def test_a_busy_machine_gets_no_background_work_and_its_background_task_is_paused(
    mesh_factory: MeshFactory,
    burners: CpuBurners,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mesh = await mesh_factory(slots=4, **GUARD)
    client, node_id = mesh.client, mesh.node.node_id
    events: list[task_pb2.Event] = []
    watcher = asyncio.create_task(follow(client, events))
    try:
        # A background task runs (a script that waits for a gate) before the machine is busy.
        gate, pid_file = tmp_path / "gate", tmp_path / "pid"
        paused = await client.submit(
            shell(
                f"echo $$ > {pid_file}; " + gate_script(gate, "echo resumed", limit=60),
                priority="background",
                timeout=timedelta(seconds=BACKGROUND_TIMEOUT),
            )
        )

        def running() -> int:
            assert any(
                e.task_id == paused.id and e.state == task_pb2.TASK_STATE_RUNNING for e in events
            )
            return int(pid_file.read_text())

        leader = await eventually(running, retry_on=(AssertionError, OSError, ValueError))
        running_since = time.monotonic()

        # The machine's own user starts burning CPU.
        await burners.start(BURNERS)

        async def throttled_and_paused() -> admin_pb2.NodeStatus:
            status = await node_status(client, node_id)
            assert status.throttled_by_load and status.paused == 1, status
            assert stopped(leader), process_state(leader)
            return status

        status = await eventually(throttled_and_paused, timeout=SETTLE)
        assert status.min_priority == task_pb2.PRIORITY_HIGH
        assert status.throttle_reason.startswith("cpu "), status.throttle_reason

        # Background work is no longer sent to it; high-priority work still is.
        held_back = await client.submit(shell(["echo", "later"], priority="background"))
        urgent = await client.submit(shell(["echo", "urgent"], priority="high"))
        done = await client.wait(urgent.id, timeout=WAIT)
        assert done.state == task_pb2.TASK_STATE_SUCCEEDED and done.node_id == node_id
        waiting = await client.get(held_back.id)
        assert waiting.state == task_pb2.TASK_STATE_QUEUED
        assert (
            f"node {node_id} takes only HIGH or higher priority now: its machine is busy"
            in waiting.pending_reason
        ), waiting.pending_reason

        monkeypatch.setenv("SHOAL_TOKEN", mesh.token)
        monkeypatch.setenv("SHOAL_COORDINATOR", mesh.address)
        monkeypatch.setenv("COLUMNS", "250")
        listed = await run_tool([str(BIN / "shoal"), "nodes"])
        assert listed.returncode == 0, listed.stderr
        assert "throttled, 1 paused" in listed.stdout, listed.stdout
        assert "machine busy (cpu" in listed.stdout, listed.stdout

        # Held paused past its timeout: the clock does not run while it is stopped.
        def past_its_timeout() -> None:
            assert time.monotonic() - running_since > BACKGROUND_TIMEOUT + 0.5

        await eventually(past_its_timeout, timeout=BACKGROUND_TIMEOUT + 5, interval=0.1)

        def still_stopped() -> None:  # a sample may catch it in a transient state
            assert stopped(leader), process_state(leader)

        await eventually(still_stopped, timeout=2.0)

        # The user stops: the node is calm again, resumes its task and takes background work.
        await burners.stop()

        async def calm() -> None:
            status = await node_status(client, node_id)
            assert not status.throttled_by_load and status.paused == 0, status
            assert not stopped(leader), process_state(leader)

        await eventually(calm, timeout=SETTLE)
        later = await client.wait(held_back.id, timeout=WAIT)
        assert later.state == task_pb2.TASK_STATE_SUCCEEDED and later.node_id == node_id
        gate.touch()
        resumed = await client.wait(paused.id, timeout=WAIT)
        assert resumed.state == task_pb2.TASK_STATE_SUCCEEDED, resumed.result
        assert resumed.result.stdout == "resumed\n"

        # Watchers saw the node throttled with its task paused, then calm.
        notices = [(e.node.throttled, e.node.paused) for e in events if e.HasField("node")]
        assert notices[0] == (True, 0) or notices[0] == (True, 1), notices
        assert (True, 1) in notices and notices[-1] == (False, 0), notices
        assert all(e.node.node_id == node_id for e in events if e.HasField("node"))
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
