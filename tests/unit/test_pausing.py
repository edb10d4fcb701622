"""Pausing a task: its process groups stop and continue, its timeout's clock stops."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import psutil
import pytest

from shoal.node.deadline import PausableDeadline
from shoal.node.executors.groups import ProcessGroups

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Two `sleep` processes, each leading its own session; killed (and continued) in teardown."""
    procs = [subprocess.Popen(["sleep", "60"], start_new_session=True) for _ in range(2)]
    yield procs
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


async def status_becomes(pid: int, wanted: set[str]) -> None:
    deadline = time.monotonic() + 10
    while (status := psutil.Process(pid).status()) not in wanted:
        assert time.monotonic() < deadline, f"{pid} is {status}, not {wanted}"
        await asyncio.sleep(0.02)


STOPPED = {psutil.STATUS_STOPPED}
RUNNING = {psutil.STATUS_SLEEPING, psutil.STATUS_RUNNING}


async def test_paused_groups_stop_and_resumed_ones_go_on(
    sleepers: list[subprocess.Popen[bytes]],
) -> None:
    first, second = sleepers
    changes: list[bool] = []
    groups = ProcessGroups(lambda: changes.append(groups.stopped))
    groups.add(first.pid)
    assert not groups.stopped
    groups.pause()
    await status_becomes(first.pid, STOPPED)
    groups.add(second.pid)  # started while paused: stopped at once
    await status_becomes(second.pid, STOPPED)
    assert groups.stopped and set(groups) == {first.pid, second.pid}
    groups.resume()
    await status_becomes(first.pid, RUNNING)
    await status_becomes(second.pid, RUNNING)
    groups.discard(first.pid)
    groups.discard(second.pid)
    groups.pause()
    assert groups.paused and not groups.stopped  # nothing left to stop
    # Told only when `stopped` may change: while paused.
    assert changes == [True, True, False, False]


def test_a_group_that_is_gone_is_no_error() -> None:
    proc = subprocess.Popen(["true"], start_new_session=True)
    proc.wait()
    groups = ProcessGroups()
    groups.add(proc.pid)
    groups.pause()
    groups.resume()


async def test_the_timeout_does_not_run_while_paused() -> None:
    deadline = PausableDeadline()
    async with deadline.running(0.3):
        deadline.pause()
        await asyncio.sleep(0.5)  # past the timeout: it does not fire while paused
        left = deadline.left
        assert left is not None and 0.15 < left <= 0.3
        deadline.resume()
        await asyncio.sleep(0)
    assert deadline.left is None
    with pytest.raises(TimeoutError):  # and once resumed, it fires with what it had left
        async with deadline.running(0.3):
            deadline.pause()
            await asyncio.sleep(0.4)
            deadline.resume()
            await asyncio.sleep(5)


async def test_paused_before_the_block_starts_the_clock_stopped() -> None:
    deadline = PausableDeadline()
    deadline.pause()
    async with deadline.running(0.05):
        await asyncio.sleep(0.2)
    deadline.resume()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with deadline.running(0.05):
            await asyncio.sleep(5)
    assert time.monotonic() - started < 4  # not paused now: it fires


async def test_no_timeout_stays_none() -> None:
    deadline = PausableDeadline()
    async with deadline.running(None):
        deadline.pause()
        assert deadline.left is None
        deadline.resume()
        assert deadline.left is None
