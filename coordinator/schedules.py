"""Periodic tasks: when each schedule fires next, and what a firing owes. No I/O, no clock.

A schedule is a TaskSpec plus a cron expression (croniter) or an interval. Firing times are
wall-clock seconds; the core keeps one timer per schedule and asks `fire` what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadCronError, croniter

from shoal.errors import InvalidArgument
from shoal.v1 import admin_pb2

__all__ = ["MAX_CATCH_UP", "ScheduleState", "check", "next_after"]

MAX_CATCH_UP = 100
"""CATCH_UP_ALL runs at most this many missed firings."""

_MIN_EVERY = timedelta(seconds=1)


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidArgument(f"unknown timezone {name!r}") from None


def check(schedule: admin_pb2.Schedule) -> None:
    """InvalidArgument unless the schedule's timing is well formed."""
    when = schedule.WhichOneof("when")
    if when is None:
        raise InvalidArgument("set cron or every")
    if when == "cron":
        if not croniter.is_valid(schedule.cron):
            raise InvalidArgument(f"bad cron expression {schedule.cron!r}")
        _zone(schedule.timezone)
    elif not (_MIN_EVERY.total_seconds() <= schedule.every.seconds <= 10 * 365 * 86400):
        raise InvalidArgument("every must be between 1 second and 10 years")


def next_after(schedule: admin_pb2.Schedule, after: float) -> float:
    """The first firing time strictly after `after` (wall-clock seconds)."""
    if schedule.WhichOneof("when") == "every":
        every = schedule.every.ToNanoseconds() / 1e9
        return after + every
    start = datetime.fromtimestamp(after, _zone(schedule.timezone))
    try:
        return float(croniter(schedule.cron, start).get_next(float))
    except CroniterBadCronError:
        raise InvalidArgument(f"bad cron expression {schedule.cron!r}") from None


@dataclass
class ScheduleState:
    """A stored schedule and what happens when its time comes."""

    schedule: admin_pb2.Schedule

    @property
    def name(self) -> str:
        return self.schedule.name

    @property
    def next_run(self) -> float:
        return self.schedule.next_run.ToNanoseconds() / 1e9

    def start(self, now: float) -> None:
        """Set the first firing time after `now` (on creation, or on resume)."""
        self.schedule.next_run.FromNanoseconds(int(next_after(self.schedule, now) * 1e9))

    def fire(self, now: float, previous_running: bool) -> int:
        """Runs owed at `now` (0 when skipped or not due), and move next_run past `now`.

        Missed firings (the coordinator was down) count by the catch-up policy; a run still
        going skips them all under OVERLAP_SKIP.
        """
        s = self.schedule
        due = self.next_run
        if s.paused or due > now:
            return 0
        missed = 0
        while due <= now and missed <= MAX_CATCH_UP:
            missed += 1
            due = next_after(s, due)
        if due <= now:  # more than MAX_CATCH_UP behind: jump ahead
            due = next_after(s, now)
        s.next_run.FromNanoseconds(int(due * 1e9))
        if s.overlap != admin_pb2.Schedule.OVERLAP_ALLOW and previous_running:
            s.skipped += missed
            return 0
        late = missed > 1
        if s.catch_up == admin_pb2.Schedule.CATCH_UP_ALL:
            owed = min(missed, MAX_CATCH_UP)
        elif s.catch_up == admin_pb2.Schedule.CATCH_UP_NONE and late:
            owed = 0
        else:
            owed = 1
        s.skipped += missed - owed
        return owed
