"""Timers for tasks: one heap for every due time the core keeps. No I/O, no clock of its own."""

from __future__ import annotations

import heapq
from enum import Enum

__all__ = ["TimerKind", "Timers"]


class TimerKind(Enum):
    RELEASE = "release"  # not_before reached, or a retry's backoff over: the task may be queued
    QUEUE_TIMEOUT = "queue_timeout"  # not started in time: TIMED_OUT
    SCHEDULE = "schedule"  # a schedule (keyed by its name) fires
    BREAKER = "breaker"  # an open circuit breaker (keyed by its key) turns half-open
    ADMISSION = "admission"  # a quota's next slot or window (keyed by the waiting key)
    LEASE = "lease"  # a lock lease (keyed by its holder id) ends
    RECOVERY = "recovery"  # the restart grace ends: recovered tasks not reclaimed are queued
    UNPLACEABLE = "unplaceable"  # tasks of a class no node can run (keyed by the class's timer)


class Timers:
    """At most one due time per (kind, key); setting again replaces, cancelled ones are skipped.

    Every operation is O(log n); nothing scans all timers.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, TimerKind, str]] = []
        self._due: dict[tuple[TimerKind, str], float] = {}
        self._counter = 0

    def __len__(self) -> int:
        return len(self._due)

    def set(self, kind: TimerKind, task_id: str, due: float) -> None:
        self._due[kind, task_id] = due
        self._counter += 1
        heapq.heappush(self._heap, (due, self._counter, kind, task_id))

    def cancel(self, kind: TimerKind, task_id: str) -> None:
        self._due.pop((kind, task_id), None)

    def next_due(self) -> float | None:
        """The earliest due time still set, or None."""
        while self._heap:
            due, _, kind, task_id = self._heap[0]
            if self._due.get((kind, task_id)) == due:
                return due
            heapq.heappop(self._heap)  # cancelled or replaced
        return None

    def pop_due(self, now: float) -> list[tuple[TimerKind, str]]:
        """Every timer due at `now` or before, earliest first; they are removed."""
        out: list[tuple[TimerKind, str]] = []
        while (due := self.next_due()) is not None and due <= now:
            _, _, kind, task_id = heapq.heappop(self._heap)
            del self._due[kind, task_id]
            out.append((kind, task_id))
        return out
