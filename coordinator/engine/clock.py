"""The engine's timer loop: one task, one heap of timers, each routed to its owner."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from shoal.auth import COORDINATOR
from shoal.coordinator.encoding import task_change
from shoal.coordinator.engine.dispatch import Dispatcher
from shoal.coordinator.engine.lifecycle import TaskLifecycle
from shoal.coordinator.engine.nodes import NodeSessions
from shoal.coordinator.engine.states import FAILED, PENDING, QUEUED, TIMED_OUT
from shoal.coordinator.records import TaskRecord
from shoal.coordinator.schedules import ScheduleBook
from shoal.coordinator.timers import TimerKind
from shoal.specs import is_final
from shoal.v1 import task_pb2

__all__ = ["TimerLoop"]

_log = logging.getLogger("shoal.coordinator")


class TimerLoop:
    """Acts on due timers, each routed to its owner: task release and queue timeouts, schedules,
    breakers, admission retries, lock leases, unplaceable tasks, the end of the restart grace."""

    def __init__(
        self,
        kernel: TaskLifecycle,
        dispatcher: Dispatcher,
        nodes: NodeSessions,
        schedules: ScheduleBook,
    ) -> None:
        self._k = kernel
        self._d = dispatcher
        self._n = nodes
        self.schedules = schedules

    async def run(self) -> None:
        assert self._k.timer_wake is not None
        while True:
            due = self._k.timers.next_due()
            wait = 1.0 if due is None else min(1.0, max(0.0, due - self._k.time.now()))
            self._k.timer_wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._k.timer_wake.wait()
            self.tick()

    def tick(self) -> None:
        """Act on every timer that is due: release waiting tasks, time out unstarted ones,
        fire schedules, half-open breakers, end the restart grace."""
        if step := self._k.time.stepped():
            self._k.timers.shift(step)
        for kind, task_id in self._k.timers.pop_due(self._k.time.now()):
            if kind is TimerKind.SCHEDULE:
                self.schedules.fire(task_id)
                continue
            if kind is TimerKind.BREAKER:
                if (breaker := self._k.breakers.half_open(task_id)) is not None:
                    self._d.breaker_changed(breaker)
                continue
            if kind is TimerKind.RECOVERY:
                self._n.end_recovery()
                continue
            if kind is TimerKind.ADMISSION:
                self._d.wake(task_id)
                continue
            if kind is TimerKind.LEASE:
                self._d.leases.expire(task_id)
                continue
            if kind is TimerKind.UNPLACEABLE:
                self.fail_unplaceable(task_id, self._k.wall())
                continue
            rec = self._k.tasks.get(task_id)
            if rec is None or is_final(rec.state):
                continue
            if kind is TimerKind.RELEASE and rec.state == PENDING and not rec.waiting_on:
                rec.release_at = None
                self._k.admit(rec)
                self._k.events.emit(task_change(rec, by=COORDINATOR))
            elif kind is TimerKind.QUEUE_TIMEOUT and rec.state in (PENDING, QUEUED):
                error = f"not started within its queue timeout of {rec.queue_timeout:g} s"
                self._k.finish(rec, TIMED_OUT, task_pb2.TaskResult(error=error), by=COORDINATOR)

    def fail_unplaceable(self, timer: str, now: float) -> None:
        """Fail the tasks of a class no connected node can run whose grace is over."""
        sweep = self._k.unplaceable.sweep(timer, now)
        if sweep.expired:
            error = f"FAILED_PRECONDITION: no connected node can run it: {sweep.reason}"
            for queued in sweep.expired:
                rec: TaskRecord = queued  # type: ignore[assignment]
                self._k.finish(rec, FAILED, task_pb2.TaskResult(error=error), by=COORDINATOR)
            _log.info(
                "%d tasks failed: no connected node can run them: %s",
                len(sweep.expired),
                sweep.reason,
            )
        if sweep.again_at is not None:
            self._k.set_timer(TimerKind.UNPLACEABLE, timer, sweep.again_at, calendar=True)
