"""The resource guard: a node backs off while its machine's own user needs the machine.

The guard watches the machine's *foreground* load: the CPU and memory used by everything but
the node itself and its tasks. Over a threshold for a while, the machine is busy (the node
takes only high-priority work, and may pause its background tasks); below the threshold by a
margin for a while, it is calm again. The two thresholds apart and the two waits keep it from
flapping on a spike.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Protocol, Self

import psutil

if TYPE_CHECKING:
    from shoal.config import NodeSettings

__all__ = ["ForegroundLoad", "Load", "LoadSource", "ResourceGuard", "Thresholds"]


@dataclass(frozen=True, slots=True)
class Load:
    """One sample in percent of the machine: what everything but the node and its tasks uses
    (`cpu_percent`, `memory_percent`), and what the node and its tasks use."""

    cpu_percent: float
    memory_percent: float
    node_cpu_percent: float = 0.0
    node_memory_percent: float = 0.0

    def __str__(self) -> str:
        return (
            f"cpu {self.cpu_percent:.0f}% memory {self.memory_percent:.0f}%"
            f" (the node and its tasks: cpu {self.node_cpu_percent:.0f}%"
            f" memory {self.node_memory_percent:.0f}%)"
        )


class LoadSource(Protocol):
    """Where samples come from; `ForegroundLoad` on a real machine, a stub in tests."""

    def sample(self, task_sessions: Collection[int]) -> Load:
        """The load since the previous sample; `task_sessions` are the session ids of the
        node's running tasks. May block briefly (it reads /proc): call it off the event loop."""
        ...


def _busy_and_total(times: object) -> tuple[float, float]:
    """CPU seconds spent busy and in all, from `psutil.cpu_times()` (as psutil counts them)."""
    total = sum(times)  # type: ignore[call-overload]
    total -= getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)  # in user already
    idle = getattr(times, "idle", 0.0) + getattr(times, "iowait", 0.0)
    return total - idle, total


def _cpu_seconds(proc: psutil.Process) -> float:
    """A process's CPU time, with what its children it has reaped used: nothing is lost when a
    task's process ends, since its time moves to its parent's children fields."""
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


class ForegroundLoad:
    """Samples the machine with psutil and takes out the node's share.

    The node's share: its own process with what the children it reaped used, and while tasks
    run, its descendants (tasks run as its children, each in its own session) and any process
    in a task's session that has left its tree (a daemonised grandchild). A process that
    escapes both (a new session and a new parent) counts as foreground. CPU is measured between
    two samples, so the first sample reports none. While no task runs a sample reads a few
    /proc files; while tasks run it scans the machine's processes (a few ms per hundred).
    """

    def __init__(self, node_pid: int | None = None) -> None:
        self._node = psutil.Process(node_pid if node_pid is not None else os.getpid())
        self._previous: tuple[float, float, float] | None = None  # busy, total, node's

    def sample(self, task_sessions: Collection[int]) -> Load:
        node_cpu, node_rss = self._node_usage(task_sessions)
        busy, total = _busy_and_total(psutil.cpu_times())
        memory = psutil.virtual_memory()
        previous, self._previous = self._previous, (busy, total, node_cpu)
        machine = mine = 0.0
        if previous is not None and total > previous[1]:
            elapsed = total - previous[1]
            machine = 100.0 * (busy - previous[0]) / elapsed
            # Negative when a process of a task's session left it and ended unseen: none then.
            mine = 100.0 * max(0.0, node_cpu - previous[2]) / elapsed
        used = memory.total - memory.available
        return Load(
            cpu_percent=min(100.0, max(0.0, machine - mine)),
            memory_percent=100.0 * max(0, used - node_rss) / memory.total,
            node_cpu_percent=min(100.0, mine),
            node_memory_percent=100.0 * min(node_rss, memory.total) / memory.total,
        )

    def _node_usage(self, task_sessions: Collection[int]) -> tuple[float, int]:
        """CPU seconds and resident bytes of the node and its tasks' processes."""
        cpu, rss = 0.0, 0
        for proc in self._node_processes(task_sessions):
            try:
                with proc.oneshot():
                    cpu += _cpu_seconds(proc)
                    rss += proc.memory_info().rss
            except psutil.Error:
                continue  # ended meanwhile, or a zombie: its time is its parent's now
        return cpu, rss

    def _node_processes(self, task_sessions: Collection[int]) -> Iterable[psutil.Process]:
        """The node's process, and while tasks run, theirs: a scan of the machine's processes."""
        found: dict[int, psutil.Process] = {self._node.pid: self._node}
        if not task_sessions:
            return found.values()  # what ended is in the node's children fields
        children: dict[int, list[psutil.Process]] = {}
        for proc in psutil.process_iter(["ppid"]):
            children.setdefault(proc.info["ppid"], []).append(proc)
            try:
                if os.getsid(proc.pid) in task_sessions:
                    found[proc.pid] = proc
            except OSError:
                continue
        stack = [self._node.pid]
        while stack:
            for child in children.get(stack.pop(), ()):
                if child.pid != self._node.pid:  # a pid reused in a loop: never twice
                    found[child.pid] = child
                    stack.append(child.pid)
        return found.values()


@dataclass(frozen=True, slots=True)
class Thresholds:
    """When the machine is busy: foreground CPU or memory over its percent for `busy_after`.

    It is calm again once both stay `margin` points under their percents for `calm_after`.
    """

    cpu_percent: float = 70.0
    memory_percent: float = 85.0
    margin: float = 10.0
    busy_after: timedelta = timedelta(seconds=3)
    calm_after: timedelta = timedelta(seconds=10)

    @classmethod
    def from_settings(cls, settings: NodeSettings) -> Self:
        """The thresholds a node's settings (its `guard_*` fields) give."""
        return cls(
            cpu_percent=settings.guard_cpu_percent,
            memory_percent=settings.guard_memory_percent,
            margin=settings.guard_margin_percent,
            busy_after=settings.guard_busy_after,
            calm_after=settings.guard_calm_after,
        )


class ResourceGuard:
    """Whether the machine is busy with its own work, from samples of its foreground load.

    `observe` applies a sample taken now (by the injected clock); `async_check` takes one from
    the source in a thread first. Both return whether `busy` changed.
    """

    def __init__(
        self,
        source: LoadSource,
        thresholds: Thresholds | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.thresholds = thresholds if thresholds is not None else Thresholds()
        self.busy = False
        self.reason = ""  # while busy: what made it so, e.g. "cpu 93% > 70%"
        self.last: Load | None = None
        self._clock = clock
        self._since: float | None = None  # when the samples began to say the other state

    def observe(self, load: Load) -> bool:
        """Apply a sample; returns whether `busy` changed."""
        self.last = load
        now = self._clock()
        t = self.thresholds
        over = self._over(load)
        if self.busy:
            calm = (
                load.cpu_percent < t.cpu_percent - t.margin
                and load.memory_percent < t.memory_percent - t.margin
            )
            turning, wait = calm, t.calm_after
        else:
            turning, wait = bool(over), t.busy_after
        if not turning:
            self._since = None
            return False
        if self._since is None:
            self._since = now
        if now - self._since < wait.total_seconds():
            return False
        self._since = None
        self.busy = not self.busy
        self.reason = ", ".join(over) if self.busy else ""
        return True

    async def async_check(self, task_sessions: Collection[int] = ()) -> bool:
        """Take a sample off the event loop and apply it; returns whether `busy` changed."""
        load = await asyncio.to_thread(self.source.sample, frozenset(task_sessions))
        return self.observe(load)

    def _over(self, load: Load) -> list[str]:
        """Each threshold the sample is over, as `cpu 93% > 70%`."""
        t = self.thresholds
        out = []
        if load.cpu_percent > t.cpu_percent:
            out.append(f"cpu {load.cpu_percent:.0f}% > {t.cpu_percent:g}%")
        if load.memory_percent > t.memory_percent:
            out.append(f"memory {load.memory_percent:.0f}% > {t.memory_percent:g}%")
        return out
