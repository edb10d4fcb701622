"""Timers for tasks: one heap for every due time the core keeps. No I/O, no clock of its own.

Due times are steady seconds (see clock.Clock); a calendar timer (a cron time, a `not_before`
date) moves with the wall clock when it steps (`shift`).
"""

from __future__ import annotations

import heapq
from enum import Enum
from typing import Protocol

__all__ = ["SetTimer", "TimerKind", "Timers"]


class TimerKind(Enum):
    RELEASE = "release"  # not_before reached, or a retry's backoff over: the task may be queued
    QUEUE_TIMEOUT = "queue_timeout"  # not started in time: TIMED_OUT
    SCHEDULE = "schedule"  # a schedule (keyed by its name) fires
    BREAKER = "breaker"  # an open circuit breaker (keyed by its key) turns half-open
    ADMISSION = "admission"  # a quota's next slot or window (keyed by the waiting key)
    LEASE = "lease"  # a lock lease (keyed by its holder id) ends
    RECOVERY = "recovery"  # the restart grace ends: recovered tasks not reclaimed are queued


class SetTimer(Protocol):
    """Time `kind` for `key` at steady time `due` (`calendar`: at wall time `due`)."""

    def __call__(
        self, kind: TimerKind, key: str, due: float, /, *, calendar: bool = False
    ) -> None: ...


class Timers:
    """At most one due time per (kind, key); setting again replaces, cancelled ones are skipped.

    Every operation is O(log n); only `shift` (on a wall-clock step) visits the calendar ones.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, TimerKind, str]] = []
        self._due: dict[tuple[TimerKind, str], float] = {}
        self._calendar: set[tuple[TimerKind, str]] = set()  # of _due: dates on the wall clock
        self._counter = 0

    def __len__(self) -> int:
        return len(self._due)

    def set(self, kind: TimerKind, task_id: str, due: float, *, calendar: bool = False) -> None:
        """Set a due time; `calendar`: it is a wall-clock date, moved by `shift`."""
        self._due[kind, task_id] = due
        if calendar:
            self._calendar.add((kind, task_id))
        elif self._calendar:
            self._calendar.discard((kind, task_id))
        self._counter += 1
        heapq.heappush(self._heap, (due, self._counter, kind, task_id))

    def cancel(self, kind: TimerKind, task_id: str) -> None:
        self._due.pop((kind, task_id), None)
        if self._calendar:
            self._calendar.discard((kind, task_id))

    def shift(self, step: float) -> None:
        """The wall clock stepped by `step` seconds: calendar timers come that much sooner."""
        for key in list(self._calendar):
            self.set(*key, self._due[key] - step, calendar=True)

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
            if self._calendar:
                self._calendar.discard((kind, task_id))
            out.append((kind, task_id))
        return out
