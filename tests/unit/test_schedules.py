"""Schedules: firing times, catch-up and overlap, alone and in the core under an injected clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from shoal import shell
from shoal.auth import Principal, Role
from shoal.coordinator.engine import Coordinator
from shoal.coordinator.schedules import MAX_CATCH_UP, ScheduleState, check, next_after
from shoal.coordinator.store import SqliteStore
from shoal.errors import AlreadyExists, InvalidArgument, NotFound
from shoal.v1 import admin_pb2, task_pb2

from .test_core import NODE, hello
from .test_quotas import dispatched

ROOT = Principal("root", Role.ADMIN)
# 2026-11-22 10:00:30 UTC
T0 = datetime(2026, 11, 22, 10, 0, 30, tzinfo=UTC).timestamp()
Sched = admin_pb2.Schedule


def every(seconds: float, **kw: object) -> admin_pb2.Schedule:
    s = admin_pb2.Schedule(name="tick", spec=shell("true"), **kw)  # type: ignore[arg-type]
    s.every.FromTimedelta(timedelta(seconds=seconds))
    return s


def cron(expr: str, **kw: object) -> admin_pb2.Schedule:
    return admin_pb2.Schedule(name="cron", spec=shell("true"), cron=expr, **kw)  # type: ignore[arg-type]


def test_next_firing_times() -> None:
    assert next_after(cron("* * * * *"), T0) == T0 + 30  # the next minute boundary
    assert (
        next_after(cron("0 9 * * *", timezone="Europe/Paris"), T0)
        == datetime(2026, 11, 23, 8, 0, tzinfo=UTC).timestamp()
    )
    assert next_after(every(2), T0) == T0 + 2


def test_bad_timing_is_refused() -> None:
    for bad in (cron("61 * * * *"), cron("* * * * *", timezone="Mars/Olympus"), every(0.5)):
        with pytest.raises(InvalidArgument):
            check(bad)
    with pytest.raises(InvalidArgument, match="cron or every"):
        check(admin_pb2.Schedule(name="x"))


def test_catch_up_policies_after_downtime() -> None:
    owed = {}
    for policy in (Sched.CATCH_UP_ONE, Sched.CATCH_UP_ALL, Sched.CATCH_UP_NONE):
        state = ScheduleState(every(10, catch_up=policy))
        state.start(T0)
        owed[policy] = state.fire(T0 + 55, previous_running=False)  # 5 firings were due
        assert state.next_run == T0 + 60
    assert owed == {Sched.CATCH_UP_ONE: 1, Sched.CATCH_UP_ALL: 5, Sched.CATCH_UP_NONE: 0}
    far = ScheduleState(every(1, catch_up=Sched.CATCH_UP_ALL))
    far.start(T0)
    assert far.fire(T0 + 10_000, previous_running=False) == MAX_CATCH_UP
    assert far.next_run > T0 + 10_000


def test_overlap_skips_while_the_previous_run_goes_on() -> None:
    skip = ScheduleState(every(2))
    allow = ScheduleState(every(2, overlap=Sched.OVERLAP_ALLOW))
    for state in (skip, allow):
        state.start(T0)
    assert skip.fire(T0 + 2, previous_running=True) == 0
    assert skip.schedule.skipped == 1
    assert allow.fire(T0 + 2, previous_running=True) == 1
    assert skip.fire(T0 + 3, previous_running=False) == 0  # not due again until T0 + 4


class Wall:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def core(tmp_path: Path) -> AsyncIterator[tuple[Coordinator, Wall]]:
    wall = Wall()
    c = Coordinator(SqliteStore(tmp_path / "s.db"), clock=wall, wall=wall)
    await c.start()
    yield c, wall
    await c.stop()


async def _settle(c: Coordinator) -> None:
    """Let the submits a tick spawned finish (they await the store)."""
    while c._k.background:
        await asyncio.gather(*c._k.background, return_exceptions=True)


async def _tasks(c: Coordinator) -> list[task_pb2.Task]:
    tasks, _ = await c.list_tasks(states=[], tenant="", limit=100, page_token="", by=ROOT)
    return tasks


async def test_cron_and_interval_schedules_fire_on_time(
    core: tuple[Coordinator, Wall],
) -> None:
    c, wall = core
    await c.create_schedule(cron("* * * * *"), by=ROOT)
    made = await c.create_schedule(every(2, overlap=Sched.OVERLAP_ALLOW), by=ROOT)
    assert made.next_run.ToNanoseconds() / 1e9 == T0 + 2
    with pytest.raises(AlreadyExists):
        await c.create_schedule(every(5), by=ROOT)

    fired: list[tuple[float, int]] = []
    for step in range(1, 31):  # 30 s in 1 s steps
        wall.now = T0 + step
        c.tick()
        await _settle(c)
        fired.append((step, len(await _tasks(c))))
    counts = dict(fired)
    assert counts[1] == 0 and counts[2] == 1 and counts[3] == 1 and counts[4] == 2
    assert counts[29] == 14  # every 2 s: 14 runs by T0 + 29
    assert counts[30] == 16  # T0 + 30 is 10:01:00: the cron run and the 15th interval run
    names = {t.spec.metadata["shoal.schedule"] for t in await _tasks(c)}
    assert names == {"tick", "cron"}
    (tick,) = [s for s in c.schedules() if s.name == "tick"]
    assert tick.runs == 15 and tick.created_by == "root"


async def test_overlap_skip_in_the_core_and_pause(core: tuple[Coordinator, Wall]) -> None:
    c, wall = core
    await c.create_schedule(every(2), by=ROOT)  # no node: its first run only waits
    for step in (2, 4, 6):
        wall.now = T0 + step
        c.tick()
        await _settle(c)
    assert len(await _tasks(c)) == 1  # no second run queues behind it ...
    (state,) = c.schedules()
    assert state.skipped == 0  # ... and none is skipped: the waiting run has yet to run
    node = c.attach(hello("n1", slots=1), "peer", by=NODE)
    assert len(await dispatched(node)) == 1  # now it runs: firings meanwhile are skipped
    for step in (8, 10):
        wall.now = T0 + step
        c.tick()
        await _settle(c)
    (state,) = c.schedules()
    assert (state.runs, state.skipped) == (1, 2)
    await c.pause_schedule("tick", paused=True)
    wall.now = T0 + 100
    c.tick()
    await _settle(c)
    assert c.schedules()[0].runs == 1
    await c.delete_schedule("tick")
    assert c.schedules() == []


async def test_run_now_submits_one_run_and_keeps_the_timing(
    core: tuple[Coordinator, Wall],
) -> None:
    c, _ = core
    await c.create_schedule(every(60), by=ROOT)
    await c.pause_schedule("tick", paused=True)
    (before,) = c.schedules()
    shown = await c.run_schedule("tick")  # paused or not, and the first run still waits
    await c.run_schedule("tick")
    tasks = await _tasks(c)
    assert [t.spec.metadata["shoal.schedule"] for t in tasks] == ["tick", "tick"]
    assert shown.runs == 1 and shown.last_task_id
    (after,) = c.schedules()
    assert after.runs == 2 and after.paused and after.next_run == before.next_run
    with pytest.raises(NotFound):
        await c.run_schedule("nope")


async def test_schedules_survive_a_restart(tmp_path: Path) -> None:
    wall = Wall()
    c = Coordinator(SqliteStore(tmp_path / "s.db"), clock=wall, wall=wall)
    await c.start()
    await c.create_schedule(every(60), by=ROOT)
    await c.stop()
    c = Coordinator(SqliteStore(tmp_path / "s.db"), clock=wall, wall=wall)
    await c.start()
    try:
        (s,) = c.schedules()
        assert s.name == "tick" and s.next_run.ToNanoseconds() / 1e9 == T0 + 60
    finally:
        await c.stop()
