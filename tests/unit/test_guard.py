"""The resource guard: hysteresis on an injected clock, and foreground load on real processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator
from datetime import timedelta

import psutil
import pytest

from shoal.node.guard import ForegroundLoad, Load, ResourceGuard, Thresholds

pytestmark = pytest.mark.timeout(30)

THRESHOLDS = Thresholds(
    cpu_percent=70,
    memory_percent=85,
    margin=10,
    busy_after=timedelta(seconds=3),
    calm_after=timedelta(seconds=10),
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Recorded:
    """A load source that returns one load and records how it was called."""

    def __init__(self, load: Load) -> None:
        self.load = load
        self.calls: list[tuple[int, Collection[int]]] = []

    def sample(self, task_sessions: Collection[int]) -> Load:
        self.calls.append((threading.get_ident(), task_sessions))
        return self.load


def make_guard() -> tuple[ResourceGuard, Clock]:
    clock = Clock()
    return ResourceGuard(Recorded(Load(0, 0)), THRESHOLDS, clock=clock), clock


def feed(
    guard: ResourceGuard, clock: Clock, seconds: int, cpu: float, memory: float = 50
) -> list[bool]:
    """One sample a second for `seconds` samples; what each returned."""
    out = []
    for _ in range(seconds):
        out.append(guard.observe(Load(cpu, memory)))
        clock.now += 1
    return out


def busy_guard() -> tuple[ResourceGuard, Clock]:
    guard, clock = make_guard()
    feed(guard, clock, 4, cpu=95)
    assert guard.busy
    return guard, clock


# -- hysteresis ------------------------------------------------------------------------------


def test_sustained_load_over_a_threshold_makes_it_busy_once() -> None:
    guard, clock = make_guard()
    assert feed(guard, clock, 3, cpu=95) == [False, False, False]  # over for 2 s so far
    assert not guard.busy
    assert feed(guard, clock, 3, cpu=95) == [True, False, False]  # 3 s: busy, said once
    assert guard.busy
    assert guard.reason == "cpu 95% > 70%"


def test_spikes_shorter_than_the_wait_change_nothing() -> None:
    guard, clock = make_guard()
    for _ in range(10):
        feed(guard, clock, 3, cpu=99)
        feed(guard, clock, 1, cpu=20)  # each dip starts the wait again
    assert not guard.busy


def test_a_threshold_is_over_only_when_exceeded() -> None:
    guard, clock = make_guard()
    feed(guard, clock, 20, cpu=70, memory=85)
    assert not guard.busy


def test_memory_alone_makes_it_busy_and_the_reason_names_each_threshold() -> None:
    guard, clock = make_guard()
    feed(guard, clock, 4, cpu=10, memory=91)
    assert guard.busy and guard.reason == "memory 91% > 85%"
    other, clock = make_guard()
    feed(other, clock, 4, cpu=80, memory=90)
    assert other.reason == "cpu 80% > 70%, memory 90% > 85%"


def test_between_the_two_thresholds_it_stays_as_it_is() -> None:
    guard, clock = busy_guard()
    feed(guard, clock, 60, cpu=65)  # under the threshold, not under it by the margin
    assert guard.busy
    calm, clock = make_guard()
    feed(calm, clock, 60, cpu=65)
    assert not calm.busy


def test_calm_needs_every_measure_under_its_margin_for_the_calm_wait() -> None:
    guard, clock = busy_guard()
    feed(guard, clock, 30, cpu=5, memory=80)  # memory over 85 - 10
    assert guard.busy
    assert feed(guard, clock, 10, cpu=5, memory=60) == [False] * 10  # under for 9 s so far
    assert guard.observe(Load(5, 60))  # 10 s
    assert not guard.busy and guard.reason == ""


def test_a_blip_restarts_the_calm_wait() -> None:
    guard, clock = busy_guard()
    feed(guard, clock, 8, cpu=5)
    feed(guard, clock, 1, cpu=62)
    assert feed(guard, clock, 10, cpu=5) == [False] * 10
    assert guard.busy
    assert guard.observe(Load(5, 50))
    assert not guard.busy


def test_busy_again_takes_the_busy_wait_again() -> None:
    guard, clock = busy_guard()
    feed(guard, clock, 11, cpu=5)
    assert not guard.busy
    assert feed(guard, clock, 4, cpu=95) == [False, False, False, True]


async def test_a_check_samples_off_the_event_loop() -> None:
    source = Recorded(Load(95, 10))
    clock = Clock()
    guard = ResourceGuard(source, THRESHOLDS, clock=clock)
    for _ in range(4):
        changed = await guard.async_check([41, 42])
        clock.now += 1
    assert changed and guard.busy
    assert guard.last == Load(95, 10)
    ((thread, sessions), *_) = source.calls
    assert thread != threading.get_ident()
    assert sessions == frozenset({41, 42})


# -- the foreground load of a real machine ---------------------------------------------------


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Starts processes in their own sessions (as tasks run); all are killed in teardown."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*argv: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, start_new_session=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()  # one that left the group, too
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


BURN = (sys.executable, "-c", "while True: pass")


async def child_of(pid: int) -> int:
    """The pid of the first child of `pid`, once it has one."""
    deadline = time.monotonic() + 15
    while not (children := psutil.Process(pid).children()):
        assert time.monotonic() < deadline, f"{pid} started no child"
        await asyncio.sleep(0.02)
    return children[0].pid


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


async def burn_for(pid: int, seconds: float) -> None:
    """Return once `pid` has used `seconds` more CPU (fails after a deadline)."""
    start = cpu_seconds(pid)
    deadline = time.monotonic() + 15
    while cpu_seconds(pid) - start < seconds:
        assert time.monotonic() < deadline, "the burner got no CPU"
        await asyncio.sleep(0.05)


def share(cpu: float, wall: float) -> float:
    """CPU seconds over `wall` seconds, in percent of the machine."""
    return 100.0 * cpu / (wall * (psutil.cpu_count() or 1))


async def test_a_tasks_session_is_the_nodes_share_and_a_strangers_process_is_foreground(
    spawn: Callable[..., subprocess.Popen[bytes]],
) -> None:
    # A task as a node runs one: in its own session, a shell that runs the burner.
    task = spawn("sh", "-c", f"{shlex.join(BURN)}; exit 0")
    burner = await child_of(task.pid)
    other_node = spawn("sleep", "60")  # the node: this test process is no part of it
    node = ForegroundLoad(other_node.pid)  # whose task the burner is, by its session
    stranger = ForegroundLoad(other_node.pid)  # to which it is a stranger
    before, started = cpu_seconds(burner), time.monotonic()
    node.sample({task.pid})
    stranger.sample({other_node.pid})
    await burn_for(burner, 0.5)
    loads = node.sample({task.pid}), stranger.sample({other_node.pid})
    burned = share(cpu_seconds(burner) - before, time.monotonic() - started)

    node_load, stranger_load = loads
    assert burned > 5  # it had some of the machine (little when the machine is busy)
    assert node_load.node_cpu_percent >= 0.7 * burned, (burned, node_load)
    assert stranger_load.cpu_percent >= 0.7 * burned, (burned, stranger_load)
    assert stranger_load.node_cpu_percent < 0.3 * burned, (burned, stranger_load)
    for load in loads:
        assert 0 <= load.cpu_percent + load.node_cpu_percent <= 100.5
        assert 0 < load.memory_percent + load.node_memory_percent <= 100


async def test_a_tasks_process_in_a_session_of_its_own_is_still_the_nodes(
    spawn: Callable[..., subprocess.Popen[bytes]],
) -> None:
    leaves = "import os; os.setsid()\nwhile True: pass"  # its shell's child, in a new session
    task = spawn("sh", "-c", f"{shlex.join((sys.executable, '-c', leaves))}; exit 0")
    burner = await child_of(task.pid)
    mine = ForegroundLoad()  # the node is this test process: the burner is a grandchild
    before, started = cpu_seconds(burner), time.monotonic()
    mine.sample({task.pid})
    await burn_for(burner, 0.5)
    load = mine.sample({task.pid})
    burned = share(cpu_seconds(burner) - before, time.monotonic() - started)
    assert os.getsid(burner) != task.pid
    assert load.node_cpu_percent >= 0.7 * burned, (burned, load)
    assert load.node_memory_percent > 0


async def test_a_task_that_ended_between_two_samples_still_counts_as_the_nodes(
    spawn: Callable[..., subprocess.Popen[bytes]],
) -> None:
    mine = ForegroundLoad()
    mine.sample(())
    started = time.monotonic()
    burner = spawn(*BURN)
    await burn_for(burner.pid, 0.5)
    burner.kill()
    burner.wait()  # reaped: its time is now this process's children's
    after = psutil.Process(os.getpid()).cpu_times()
    load = mine.sample(())
    assert after.children_user + after.children_system >= 0.5
    burned = share(0.5, time.monotonic() - started)
    assert load.node_cpu_percent >= 0.7 * burned, (burned, load)


def test_the_first_sample_has_no_cpu_figure_yet() -> None:
    load = ForegroundLoad().sample(())
    assert load.cpu_percent == load.node_cpu_percent == 0.0
    assert load.memory_percent > 0
