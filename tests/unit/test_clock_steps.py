"""Wall-clock steps (issue 17): durations keep to the monotonic clock, dates follow the wall."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from shoal import shell
from shoal.config import CoreOptions
from shoal.coordinator.clock import Clock
from shoal.coordinator.engine import Coordinator
from shoal.coordinator.store import SqliteStore
from shoal.errors import FailedPrecondition
from shoal.specs import timestamp
from shoal.v1 import task_pb2

from .test_core import ALICE, NODE, hello
from .test_fault_tolerance import HALF_OPEN, OPEN, breakers, infra_failure
from .test_quotas import dispatched
from .test_schedules import ROOT, Sched, cron, every

# 2026-11-22 10:00:30 UTC
T0 = datetime(2026, 11, 22, 10, 0, 30, tzinfo=UTC).timestamp()
STEPS = [-60.0, -300.0, 3600.0]  # back a minute, back five, ahead an hour


class FakeTime:
    """The core's two clocks: `advance` moves both, `step` the wall clock alone (as an NTP
    step or a hand-set date does)."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self.date = T0

    def monotonic(self) -> float:
        return self.mono

    def wall(self) -> float:
        return self.date

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.date += seconds

    def step(self, seconds: float) -> None:
        self.date += seconds


def open_core(path: Path, t: FakeTime, options: CoreOptions | None = None) -> Coordinator:
    return Coordinator(
        SqliteStore(path), options, clock=t.monotonic, wall=t.wall, rng=random.Random(5)
    )


@pytest.fixture
def t() -> FakeTime:
    return FakeTime()


@pytest.fixture
async def core(tmp_path: Path, t: FakeTime) -> AsyncIterator[Coordinator]:
    options = CoreOptions(breaker_threshold=3, breaker_cooldown=timedelta(seconds=30))
    c = open_core(tmp_path / "s.db", t, options)
    await c.start()
    yield c
    await c.stop()


async def _settle(c: Coordinator) -> None:
    """Let the submits a tick spawned finish (they await the store)."""
    while c._k.background:
        await asyncio.gather(*c._k.background, return_exceptions=True)


async def _count(c: Coordinator) -> int:
    tasks, _ = await c.list_tasks(states=[], tenant="", limit=1000, page_token="", by=ROOT)
    return len(tasks)


def test_the_clock_notices_a_step_once_and_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    t = FakeTime()
    clock = Clock(monotonic=t.monotonic, wall=t.wall)
    t.advance(10)
    t.step(3)  # within max_step: drift, not a step
    assert clock.stepped() == 0.0 and clock.now() == T0 + 10
    t.step(-300)
    with caplog.at_level(logging.WARNING, logger="shoal.coordinator"):
        assert clock.stepped() == -297.0
    assert "wall clock stepped by -297.0 s" in caplog.text
    assert clock.stepped() == 0.0  # noticed once
    assert clock.now() == T0 + 10  # steady time did not move
    assert clock.from_wall(t.wall() + 60) == clock.now() + 60  # a date an hour ahead, mapped


@pytest.mark.parametrize("step", STEPS)
async def test_an_every_schedule_keeps_its_pace_through_a_step(
    core: Coordinator, t: FakeTime, step: float
) -> None:
    await core.create_schedule(every(2, overlap=Sched.OVERLAP_ALLOW), by=ROOT)
    t.step(step)
    for _ in range(20):
        t.advance(1)
        core.tick()
        await _settle(core)
    assert await _count(core) == 10
    (s,) = core.schedules()
    assert s.runs == 10 and s.skipped == 0
    shown = s.next_run.ToNanoseconds() / 1e9  # as a date: on the wall clock as it is now
    assert t.wall() < shown <= t.wall() + 2


@pytest.mark.parametrize("step", STEPS)
async def test_a_breaker_probes_after_its_cooldown_through_a_step(
    core: Coordinator, t: FakeTime, step: float
) -> None:
    await core.submit([shell(f"echo {i}") for i in range(5)], by=ALICE)
    n1 = core.attach(hello("n1", slots=1), "peer", by=NODE)
    for _ in range(3):
        (a,) = await dispatched(n1)
        core.on_message(n1, infra_failure(a))
    assert breakers(core, "n1")["node:n1"][0] == OPEN
    t.step(step)
    t.advance(29)
    core.tick()
    assert await dispatched(n1) == [] and breakers(core, "n1")["node:n1"][0] == OPEN
    t.advance(1)
    core.tick()
    assert len(await dispatched(n1)) == 1  # the probe
    assert breakers(core, "n1")["node:n1"][0] == HALF_OPEN


@pytest.mark.parametrize("step", STEPS)
async def test_a_queue_timeout_counts_monotonic_seconds(
    core: Coordinator, t: FakeTime, step: float
) -> None:
    spec = shell("true")
    spec.queue_timeout.FromTimedelta(timedelta(seconds=600))
    spec.wait_for_node = True  # no node: it waits (rather than fail as unplaceable)
    (done,) = await core.submit([spec], by=ALICE)
    t.step(step)
    t.advance(10)
    core.tick()
    assert (await core.get(done.task_id, by=ALICE)).state == task_pb2.TASK_STATE_QUEUED
    t.advance(590)
    core.tick()
    task = await core.wait(done.task_id, timedelta(seconds=10), by=ALICE)  # once recorded
    assert task.state == task_pb2.TASK_STATE_TIMED_OUT, task.pending_reason


@pytest.mark.parametrize("step", STEPS)
async def test_a_lock_ttl_holds_through_a_step(core: Coordinator, t: FakeTime, step: float) -> None:
    minute, now = timedelta(seconds=60), timedelta(0)
    lease = await core.acquire_lock("db", minute, now, shared=False, by=ALICE)
    t.step(step)
    t.advance(5.6)
    core.tick()
    with pytest.raises(FailedPrecondition, match="held"):
        await core.acquire_lock("db", minute, now, shared=False, by=ROOT)
    t.advance(54.4)
    core.tick()
    again = await core.acquire_lock("db", minute, now, shared=False, by=ROOT)
    assert again.token == lease.token + 1


async def test_a_resent_request_id_dedupes_after_the_clock_jumps_an_hour(
    core: Coordinator, t: FakeTime
) -> None:
    (first,) = await core.submit([shell("true")], by=ALICE, request_id="r-1")
    t.step(3600)  # the store forgets request ids an hour old
    t.advance(1)
    (other,) = await core.submit([shell("true")], by=ALICE, request_id="r-2")
    (again,) = await core.submit([shell("true")], by=ALICE, request_id="r-1")
    assert (again.task_id, again.created) == (first.task_id, False)
    assert other.created and await _count(core) == 2


async def test_catch_up_all_is_bounded_when_the_clock_jumps_ahead(
    core: Coordinator, t: FakeTime
) -> None:
    await core.create_schedule(
        cron("* * * * *", catch_up=Sched.CATCH_UP_ALL, overlap=Sched.OVERLAP_ALLOW), by=ROOT
    )
    t.step(3600)  # 60 cron minutes pass at once
    for _ in range(3):
        t.advance(1)
        core.tick()
        await _settle(core)
    assert await _count(core) == CoreOptions().max_catch_up == 10
    (s,) = core.schedules()
    assert s.runs == 10
    assert s.next_run.ToNanoseconds() / 1e9 == T0 + 3630  # the next minute, by the wall


async def test_a_date_follows_the_wall_clock_and_a_timeout_does_not(
    core: Coordinator, t: FakeTime
) -> None:
    dated, timed = shell("true"), shell("true")
    dated.wait_for_node = timed.wait_for_node = True  # no node: they wait
    dated.not_before.CopyFrom(timestamp(T0 + 600))
    timed.queue_timeout.FromTimedelta(timedelta(seconds=600))
    first, second = await core.submit([dated, timed], by=ALICE)
    t.advance(1)
    core.tick()
    assert (await core.get(first.task_id, by=ALICE)).state == task_pb2.TASK_STATE_PENDING
    t.step(600)  # the date has come, though only a second passed
    core.tick()
    assert (await core.get(first.task_id, by=ALICE)).state == task_pb2.TASK_STATE_QUEUED
    assert (await core.get(second.task_id, by=ALICE)).state == task_pb2.TASK_STATE_QUEUED


async def test_stored_deadlines_are_reanchored_at_start(tmp_path: Path, t: FakeTime) -> None:
    """Deadlines stored while the wall clock was an hour ahead, corrected while the
    coordinator was down: what is left of each is bounded by its own length."""
    options = CoreOptions(max_lock_ttl=timedelta(minutes=2))
    t.step(3600)
    c = open_core(tmp_path / "s.db", t, options)
    await c.start()
    await c.acquire_lock("db", timedelta(seconds=60), timedelta(0), shared=False, by=ALICE)
    spec = shell("true")
    spec.queue_timeout.FromTimedelta(timedelta(seconds=600))
    (done,) = await c.submit([spec], by=ALICE)
    await c.create_schedule(every(30), by=ROOT)
    await c.stop()
    t.step(-3600)
    t.mono = 5.0  # a reboot: the monotonic clock starts again
    c = open_core(tmp_path / "s.db", t, options)
    await c.start()
    try:
        t.advance(30)
        c.tick()
        await _settle(c)
        assert c.schedules()[0].runs == 1  # not an hour late
        t.advance(90)
        c.tick()  # the lease: at most max_lock_ttl left
        await c.acquire_lock("db", timedelta(seconds=1), timedelta(0), shared=False, by=ROOT)
        t.advance(480)
        c.tick()
        task = await c.wait(done.task_id, timedelta(seconds=10), by=ALICE)  # once recorded
        assert task.state == task_pb2.TASK_STATE_TIMED_OUT  # at most its 600 s after all
    finally:
        await c.stop()
