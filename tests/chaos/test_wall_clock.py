"""Chaos: the coordinator's wall clock stepped back a minute, then ahead an hour (issue 17).

The coordinator process runs under libfaketime (see faketime.py): its wall clock moves, its
monotonic clock does not. Durations keep their length through the steps: an `every 2 s`
schedule keeps its pace, a 600 s queue timeout and a 60 s lock TTL do not end, a resent
request id still finds its task; the node's ledger matches what was recorded.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

import grpc
import pytest

from shoal import AsyncClient, FailedPrecondition, noop
from shoal._channel import bearer
from shoal.v1 import admin_pb2, task_pb2, tasks_pb2, tasks_pb2_grpc
from tests.chaos.cluster import Cluster
from tests.chaos.faketime import SteppedWallClock, libfaketime_unavailable
from tests.chaos.harness import observe, wait_nodes
from tests.chaos.recorder import EventRecorder
from tests.chaos.summary import publish
from tests.integration.harness import STARTUP, eventually

_UNAVAILABLE = libfaketime_unavailable()
# CI installs faketime: there a missing library fails the suite instead.
pytestmark = pytest.mark.skipif(
    bool(_UNAVAILABLE) and not os.environ.get("CI"), reason=f"wall-clock steps: {_UNAVAILABLE}"
)

EVERY = 2  # seconds between the schedule's runs
RUNS = 3  # runs each step must be followed by
STEPS = [-60, 3660]  # back a minute, then an hour ahead of the real clock
PHASE = 20.0  # seconds RUNS runs may take at most (before the fix: none in 20 s after -60 s)
QUEUE_TIMEOUT = timedelta(seconds=600)
LOCK_TTL = timedelta(seconds=60)
REQUEST_ID = "chaos-clock-request"
QUEUED = task_pb2.TASK_STATE_QUEUED


@dataclass
class Phase:
    step: int  # seconds the wall clock moved
    noticed: float | None  # the step the coordinator logged (None: it logged none)
    runs: int  # the schedule's runs from then until RUNS more were seen (or PHASE s went by)
    seconds: float  # how long that took (the test's monotonic clock)


async def schedule_runs(client: AsyncClient) -> int:
    (schedule,) = await client.schedules()
    return schedule.runs


@contextlib.asynccontextmanager
async def tasks_stub(cluster: Cluster) -> AsyncIterator[tasks_pb2_grpc.TasksStub]:
    """The raw Tasks service: a Submit that names its own request id, as a client resending."""
    async with grpc.aio.insecure_channel(cluster.address) as channel:
        yield tasks_pb2_grpc.TasksStub(channel)


async def step_and_follow(
    cluster: Cluster, client: AsyncClient, wall: SteppedWallClock, step: int
) -> Phase:
    """Step the coordinator's wall clock, wait until it logs the step, then until RUNS more
    runs of the schedule (at most STARTUP and PHASE s: the verdict is asserted once the
    figures are out)."""
    assert cluster.coordinator is not None
    coordinator = cluster.coordinator
    logged = len(_steps_logged(coordinator.output()))
    wall.step(step)

    def noticed() -> float:
        steps = _steps_logged(coordinator.output())
        assert len(steps) > logged, "the coordinator has not logged the step"
        return steps[-1]

    seen: float | None = None
    with contextlib.suppress(AssertionError):
        seen = await eventually(noticed, timeout=STARTUP, interval=0.05)
    before, started = await schedule_runs(client), time.monotonic()

    async def ran() -> None:
        runs = await schedule_runs(client)
        assert runs >= before + RUNS, f"{runs - before} runs since the step"

    with contextlib.suppress(AssertionError):
        await eventually(ran, timeout=PHASE, interval=0.05)
    return Phase(step, seen, await schedule_runs(client) - before, time.monotonic() - started)


def _steps_logged(output: str) -> list[float]:
    return [float(s) for s in re.findall(r"wall clock stepped by ([-+]?[\d.]+) s", output)]


@pytest.mark.timeout(120)
async def test_durations_keep_their_length_when_the_wall_clock_steps(cluster: Cluster) -> None:
    wall = SteppedWallClock(cluster.tmp_path / "faketime.rc")
    cluster.coordinator_env.update(wall.env())
    await cluster.start_coordinator()
    await cluster.start_node("node-a", slots=4)
    token = cluster.token_file.read_text().strip()
    schedule = admin_pb2.Schedule(
        name="chaos-clock", spec=noop(), overlap=admin_pb2.Schedule.OVERLAP_ALLOW
    )
    schedule.every.FromTimedelta(timedelta(seconds=EVERY))
    waiting = noop(labels={"pool": "nowhere"}, wait_for_node=True)  # no node has it: queued
    waiting.queue_timeout.FromTimedelta(QUEUE_TIMEOUT)
    resent = tasks_pb2.SubmitRequest(spec=noop(), request_id=REQUEST_ID)

    async with (
        cluster.client() as client,
        EventRecorder(client) as recorder,
        tasks_stub(cluster) as stub,
    ):
        await wait_nodes(client, ["node-a"])
        created = time.monotonic()
        await client.create_schedule(schedule)
        queued = await client.submit(waiting)
        lease = await client.acquire_lock("chaos-clock", ttl=LOCK_TTL)
        first = await stub.Submit(resent, metadata=bearer(token))
        phases = [await step_and_follow(cluster, client, wall, step) for step in STEPS]

        # An hour ahead, and longer than the 5.6 s after which another took the lock before.
        try:
            await client.acquire_lock("chaos-clock", ttl=LOCK_TTL)
            lock = "taken"
        except FailedPrecondition as err:
            lock = "held" if "held" in str(err) else str(err)
        still = await client.get(queued.id)
        # Another client's submit stores its own request id, the store's chance to forget
        # those an hour old; then the first request is resent.
        await client.submit(noop())
        again = await stub.Submit(resent, metadata=bearer(token))
        await client.schedule_action("pause", schedule.name)
        runs = await schedule_runs(client)
        elapsed = time.monotonic() - created
        with contextlib.suppress(FailedPrecondition):  # ended already, when the lock was taken
            await client.release_lock(lease)
        await client.cancel(queued.id)  # not to wait its 600 s

        ids = [t.id for t in await client.list(limit=1000)]
        await recorder.wait_final(ids, timeout=30)
        seen = await observe("wall-clock-steps", cluster, client, recorder, ids)

    report = seen.report
    report.figures.update(
        {f"runs_after_{p.step:+d}s": f"{p.runs}in{p.seconds:.1f}s" for p in phases},
        steps_logged=",".join(f"{p.noticed:+g}" if p.noticed else "none" for p in phases),
        runs=f"{runs}in{elapsed:.1f}s",
        queued_after_1h=task_pb2.TaskState.Name(still.state),
        lock_after_1h=lock,
        request_id_dedupes=str(again.task.id == first.task.id and not again.created),
    )
    publish(report.line())
    assert report.safe, f"{report.problems()}\n{cluster.logs()}"
    for phase in phases:
        assert phase.noticed is not None and abs(phase.noticed - phase.step) < 1.0, phase
        assert phase.runs >= RUNS, f"the schedule stalled after a {phase.step:+d} s step"
    assert runs <= elapsed / EVERY + 2, f"the schedule flooded: {runs} runs in {elapsed:.1f} s"
    assert still.state == QUEUED, (still.pending_reason, cluster.logs())
    assert lock == "held"
    assert first.created
    assert (again.task.id, again.created) == (first.task.id, False)
