"""Periodic tasks: when each schedule fires next, what a firing owes, and the book of them.

A schedule is a TaskSpec plus a cron expression (croniter) or an interval. Cron times are
dates on the wall clock; an interval runs on steady time (clock.Clock), so a wall-clock step
neither stalls nor floods it. The core keeps one timer per schedule and asks `fire` what to
do. `ScheduleState` and the functions are pure; `ScheduleBook` stores schedules and submits
runs.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadCronError, croniter

from shoal.auth import Principal, Role
from shoal.coordinator.clock import Clock
from shoal.coordinator.records import TaskRecord
from shoal.coordinator.store import Store
from shoal.coordinator.timers import SetTimer, TimerKind
from shoal.errors import AlreadyExists, InvalidArgument, NotFound, ShoalError
from shoal.specs import timestamp
from shoal.v1 import admin_pb2, task_pb2
from shoal.validation import Limits, validate_batch

if TYPE_CHECKING:
    from shoal.coordinator.engine import Submitted

__all__ = ["MAX_CATCH_UP", "ScheduleBook", "ScheduleState", "check", "next_after"]

_log = logging.getLogger("shoal.coordinator")

MAX_CATCH_UP = 100
"""CATCH_UP_ALL runs at most this many missed firings (unless told fewer)."""

_WAITING = frozenset({task_pb2.TASK_STATE_PENDING, task_pb2.TASK_STATE_QUEUED})
_RUNNING = frozenset({task_pb2.TASK_STATE_ASSIGNED, task_pb2.TASK_STATE_RUNNING})

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
    """The first firing time strictly after `after` (seconds: wall clock for cron)."""
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

    @property
    def on_calendar(self) -> bool:
        """Whether its times are wall-clock dates (cron), not steady time (an interval)."""
        return self.schedule.WhichOneof("when") != "every"

    def start(self, now: float) -> None:
        """Set the first firing time after `now` (on creation, or on resume)."""
        self.schedule.next_run.FromNanoseconds(int(next_after(self.schedule, now) * 1e9))

    def fire(
        self,
        now: float,
        previous_running: bool,
        *,
        previous_waiting: bool = False,
        max_catch_up: int = MAX_CATCH_UP,
    ) -> int:
        """Runs owed at `now` (0 when skipped or not due), and move next_run past `now`.

        Missed firings (the coordinator was down, or the wall clock stepped ahead) count by
        the catch-up policy, at most `max_catch_up` of them. Under OVERLAP_SKIP a run still
        going skips them all, and a run still waiting to start stands for them: it has yet
        to run, so they are not counted as skipped, and no second run queues behind it.
        """
        s = self.schedule
        due = self.next_run
        if s.paused or due > now:
            return 0
        missed = 0
        while due <= now and missed <= max_catch_up:
            missed += 1
            due = next_after(s, due)
        if due <= now:  # more than max_catch_up behind: jump ahead
            due = next_after(s, now)
        s.next_run.FromNanoseconds(int(due * 1e9))
        if s.overlap != admin_pb2.Schedule.OVERLAP_ALLOW:
            if previous_running:
                s.skipped += missed
                return 0
            if previous_waiting:
                return 0
        late = missed > 1
        if s.catch_up == admin_pb2.Schedule.CATCH_UP_ALL:
            owed = min(missed, max_catch_up)
        elif s.catch_up == admin_pb2.Schedule.CATCH_UP_NONE and late:
            owed = 0
        else:
            owed = 1
        s.skipped += missed - owed
        return owed


class ScheduleBook:
    """Every schedule: stored, timed by the core's timers, its runs submitted as its own."""

    def __init__(
        self,
        store: Store,
        *,
        tasks: Mapping[str, TaskRecord],
        submit: Callable[[list[task_pb2.TaskSpec], Principal], Awaitable[list[Submitted]]],
        set_timer: SetTimer,
        cancel_timer: Callable[[TimerKind, str], None],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        clock: Clock,
        limits: Limits,
        max_catch_up: int = MAX_CATCH_UP,
    ) -> None:
        self._store = store
        self._tasks = tasks  # the core's live tasks: whether a schedule's last run still runs
        self._submit = submit
        self._set_timer = set_timer
        self._cancel_timer = cancel_timer
        self._spawn = spawn
        self._clock = clock
        self._limits = limits
        self._max_catch_up = max_catch_up
        # Each schedule's next_run, as held here: a wall time for cron, a steady one for an
        # interval (shown and stored as wall time: see _shown).
        self._schedules: dict[str, ScheduleState] = {}

    async def load(self) -> None:
        """Take the stored schedules and set their timers (at start-up)."""
        for body in await self._store.schedules():
            state = ScheduleState(admin_pb2.Schedule.FromString(body))
            if not state.on_calendar:  # stored as wall time: what is left of it, at most `every`
                every = state.schedule.every.ToNanoseconds() / 1e9
                due = min(self._clock.from_wall(state.next_run), self._clock.now() + every)
                state.schedule.next_run.FromNanoseconds(int(due * 1e9))
            self._schedules[state.name] = state
            self._time(state)

    def _time(self, state: ScheduleState) -> None:
        self._set_timer(TimerKind.SCHEDULE, state.name, state.next_run, calendar=state.on_calendar)

    def _now(self, state: ScheduleState) -> float:
        return self._clock.wall() if state.on_calendar else self._clock.now()

    def _shown(self, state: ScheduleState) -> admin_pb2.Schedule:
        """The schedule as shown and stored: next_run in wall time."""
        if state.on_calendar:
            return state.schedule
        shown = admin_pb2.Schedule()
        shown.CopyFrom(state.schedule)
        shown.next_run.CopyFrom(timestamp(self._clock.to_wall(state.next_run)))
        return shown

    def fire(self, name: str) -> None:
        """The schedule's timer is due: submit what it owes (in the background), time the next."""
        state = self._schedules.get(name)
        if state is None:
            return
        last = self._tasks.get(state.schedule.last_task_id)
        owed = state.fire(
            self._now(state),
            previous_running=last is not None and last.state in _RUNNING,
            previous_waiting=last is not None and last.state in _WAITING,
            max_catch_up=self._max_catch_up,
        )
        if not state.schedule.paused:
            self._time(state)
        self._spawn(self._run(state, owed, self._clock.wall()))

    async def _run(self, state: ScheduleState, owed: int, now: float) -> None:
        """Submit what a firing owes, then store the schedule's new state."""
        s = state.schedule
        if owed:
            try:
                await self._submit_runs(state, owed, now)
            except ShoalError as err:
                _log.warning("schedule=%s could not submit: %s", s.name, err.message)
        if s.name in self._schedules:
            await self._store.put_schedule(s.name, self._shown(state).SerializeToString())

    async def _submit_runs(self, state: ScheduleState, owed: int, now: float) -> None:
        """Submit `owed` runs of the schedule's spec as the schedule, and count them."""
        s = state.schedule
        spec = task_pb2.TaskSpec()
        spec.CopyFrom(s.spec)
        spec.idempotency_key = ""
        spec.metadata["shoal.schedule"] = s.name
        by = Principal(f"schedule:{s.name}", Role.SUBMITTER, tenant=spec.tenant)
        done = await self._submit([spec] * owed, by)
        s.last_task_id = done[-1].task_id
        s.runs += owed
        s.last_run.FromNanoseconds(int(now * 1e9))

    async def run_now(self, name: str) -> admin_pb2.Schedule:
        """Submit one run now, as a firing would, paused or not; next_run stays as it was.

        An operator's explicit request: the overlap policy does not hold it back, and a
        refused submission (quota, validation) is the caller's error.
        """
        state = self._get(name)
        await self._submit_runs(state, 1, self._clock.wall())
        if name in self._schedules:
            await self._store.put_schedule(name, self._shown(state).SerializeToString())
        return self._shown(state)

    async def create(self, schedule: admin_pb2.Schedule, *, by: Principal) -> admin_pb2.Schedule:
        """Store a new schedule; its first run is its first firing time from now."""
        limits = self._limits
        if not schedule.name or len(schedule.name) > limits.max_string:
            raise InvalidArgument(f"schedule name must be 1-{limits.max_string} characters")
        if not schedule.name.isprintable():
            raise InvalidArgument("schedule name must be printable text")
        if schedule.name in self._schedules:
            raise AlreadyExists(f"a schedule named {schedule.name!r} exists")
        check(schedule)
        validate_batch([schedule.spec], limits, single=True)
        if schedule.spec.depends_on:
            raise InvalidArgument("a scheduled task cannot depend on other tasks")
        fresh = admin_pb2.Schedule(
            name=schedule.name,
            spec=schedule.spec,
            timezone=schedule.timezone,
            overlap=schedule.overlap,
            catch_up=schedule.catch_up,
            created_by=by.name,
        )
        if schedule.HasField("cron"):
            fresh.cron = schedule.cron
        else:
            fresh.every.CopyFrom(schedule.every)
        state = ScheduleState(fresh)
        state.start(self._now(state))
        shown = self._shown(state)
        await self._store.put_schedule(fresh.name, shown.SerializeToString())
        self._schedules[fresh.name] = state
        self._time(state)
        return shown

    def all(self) -> list[admin_pb2.Schedule]:
        """Every schedule, by name."""
        return [self._shown(state) for _, state in sorted(self._schedules.items())]

    def _get(self, name: str) -> ScheduleState:
        state = self._schedules.get(name)
        if state is None:
            raise NotFound(f"no schedule {name!r}")
        return state

    async def delete(self, name: str) -> admin_pb2.Schedule:
        state = self._get(name)
        await self._store.delete_schedule(name)
        del self._schedules[name]
        self._cancel_timer(TimerKind.SCHEDULE, name)
        return self._shown(state)

    async def pause(self, name: str, *, paused: bool) -> admin_pb2.Schedule:
        """Pause, or resume from now on (runs missed while paused are not made up)."""
        state = self._get(name)
        if paused == state.schedule.paused:
            return self._shown(state)
        state.schedule.paused = paused
        if paused:
            self._cancel_timer(TimerKind.SCHEDULE, name)
        else:
            state.start(self._now(state))
            self._time(state)
        shown = self._shown(state)
        await self._store.put_schedule(name, shown.SerializeToString())
        return shown
