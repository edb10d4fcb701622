"""The task-lifecycle kernel: every layer of the engine calls down into it, never back up."""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter, deque
from collections.abc import Callable, Sequence

from tenacity import AsyncRetrying, wait_exponential_jitter

from shoal.auth import COORDINATOR
from shoal.config import CoreOptions
from shoal.coordinator.clock import Clock
from shoal.coordinator.encoding import attempt_id, finished_row, task_change
from shoal.coordinator.engine.states import NO_RESULT, PENDING, QUEUED, SKIPPED, SUCCEEDED
from shoal.coordinator.events import EventLog
from shoal.coordinator.gates.breakers import Breakers, backend_key, node_key
from shoal.coordinator.gates.quotas import QuotaGate
from shoal.coordinator.placement import Routing, Scheduler, requirements_of
from shoal.coordinator.records import TaskRecord
from shoal.coordinator.retries import retry_delay
from shoal.coordinator.routes import route
from shoal.coordinator.store import Store
from shoal.coordinator.timers import TimerKind, Timers
from shoal.coordinator.unplaceable import UnplaceableBook
from shoal.specs import is_final, state_name, timestamp
from shoal.v1 import task_pb2

__all__ = ["TaskLifecycle"]

_log = logging.getLogger("shoal.coordinator")


def _no_dispatch() -> None:
    """Until a dispatcher is attached, queued tasks wait."""


class TaskLifecycle:
    """The kernel the other layers call down into: live tasks, their events, timers and queue,
    and how a task moves between states (admit, wait on upstream tasks, finish with a group
    commit, retry, requeue). It knows dispatch only as the `kick` callback."""

    def __init__(
        self,
        store: Store,
        options: CoreOptions,
        *,
        clock: Callable[[], float],
        wall: Callable[[], float],
        rng: random.Random,
    ) -> None:
        self.store = store
        self.options = options
        self.clock = clock
        self.wall = wall
        # Durations (timers, TTLs, cooldowns, buckets) on steady time; dates on the wall clock.
        self.time = Clock(monotonic=clock, wall=wall)
        self.rng = rng
        self.epoch = 0
        self.events = EventLog(0)
        self.accepting = False
        self.scheduler = Scheduler(
            tenant_weights=options.tenant_weights, routing=Routing(options.routing), rng=rng
        )
        self.tasks: dict[str, TaskRecord] = {}
        self.finished: deque[str] = deque()
        self.to_finish: list[TaskRecord] = []
        # Outcomes whose commit failed (a full disk), retried by `recorder` until one lands:
        # shown unfinished meanwhile, as after a restart they would be.
        self.unrecorded: list[TaskRecord] = []
        self.recorder: asyncio.Task[None] | None = None
        self.store_error = ""  # why the last outcome commit failed, while it is retried
        self.background: set[asyncio.Task[None]] = set()
        self.timers = Timers()
        self.timer_wake: asyncio.Event | None = None
        self.dependents: dict[str, list[str]] = {}  # upstream id -> ids waiting on it
        self.unfinished: Counter[str] = Counter()  # per tenant, for backpressure
        self.finished_count: Counter[int] = Counter()  # outcomes by state, for metrics
        self.breakers = Breakers(
            threshold=options.breaker_threshold,
            cooldown=options.breaker_cooldown.total_seconds(),
            clock=self.time.now,
            wall=wall,
        )
        self.quotas = QuotaGate(pricing=options.pricing, clock=self.time.now)
        self.unplaceable = UnplaceableBook(
            self.scheduler, grace=options.unplaceable_grace.total_seconds()
        )
        # After a restart: recovered tasks that may still run on a node that has yet to
        # reconnect (see NodeSessions.attach).
        self.recovering: set[str] = set()
        self.kick: Callable[[], None] = _no_dispatch  # the dispatch layer sets its own

    def spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def set_timer(
        self, kind: TimerKind, task_id: str, due: float, *, calendar: bool = False
    ) -> None:
        """Time `kind` for `task_id` at steady time `due`; `calendar`: at wall time `due`."""
        if calendar:
            due = self.time.from_wall(due)
        earliest = self.timers.next_due()
        self.timers.set(kind, task_id, due, calendar=calendar)
        if self.timer_wake is not None and (earliest is None or due < earliest):
            self.timer_wake.set()

    def admit(self, rec: TaskRecord) -> None:
        """Queue a task whose upstream tasks are done and whose time has come; else PENDING."""
        if rec.more is None:  # no upstream, no time to wait for, no route to choose: queued
            rec.state = QUEUED
            self.scheduler.queue.push(rec)
            self.kick()
            return
        if rec.skip_reason and not rec.waiting_on:
            rec.state = PENDING  # never queued: `finish` has nothing to take out of the queue
            self.finish(rec, SKIPPED, task_pb2.TaskResult(error=rec.skip_reason), by=COORDINATOR)
            return
        now = self.wall()
        if rec.queue_deadline is not None and rec.attempt == 0 and not rec.attempts:
            self.set_timer(TimerKind.QUEUE_TIMEOUT, rec.id, rec.queue_deadline)
        if rec.waiting_on or (rec.release_at is not None and rec.release_at > now):
            rec.state = PENDING
            if rec.release_at is not None and not rec.waiting_on:  # not_before: a date
                self.set_timer(TimerKind.RELEASE, rec.id, rec.release_at, calendar=True)
            return
        rec.release_at = None
        if rec.routed:
            self.choose_route(rec)
        rec.state = QUEUED
        self.scheduler.queue.push(rec)
        self.kick()

    def choose_route(self, rec: TaskRecord) -> None:
        """An llm task with routes takes the first one it can run by now (see LlmSpec)."""
        spec = route(rec.spec, self.route_viable)
        if spec.llm.provider != rec.spec.llm.provider or spec.llm.model != rec.spec.llm.model:
            _log.info("task=%s routed to %s:%s", rec.id, spec.llm.provider, spec.llm.model)
        rec.spec, rec.backend = spec, spec.backend
        rec.placement = requirements_of(spec)

    def route_viable(self, spec: task_pb2.TaskSpec) -> bool:
        """Whether a connected node runs `spec` with no breaker open on the way, within budget."""
        cls = requirements_of(spec).cls
        if not any(
            cls.fits(n) and self.breakers.passes(node_key(n.node_id))
            for n in self.scheduler.nodes.values()
        ):
            return False
        if spec.backend and not self.breakers.passes(backend_key(spec.backend)):
            return False
        return not self.quotas.spent(spec, self.wall())

    def link(self, rec: TaskRecord, outcomes: dict[str, tuple[int, task_pb2.TaskResult]]) -> None:
        """Note which upstream tasks `rec` waits for, and the results of those already final."""
        if not rec.upstream:
            return
        waiting: set[str] = set()
        rec.waiting_on, rec.upstream_results = waiting, {}
        for index, up_id in enumerate(rec.upstream):
            up = self.tasks.get(up_id)
            if up is not None and not (up.durable and up.result is not None):
                waiting.add(up_id)
                self.dependents.setdefault(up_id, []).append(rec.id)
            elif up is not None and up.result is not None:
                self.upstream_done(rec, index, up_id, up.state, up.result)
            elif up_id in outcomes:
                self.upstream_done(rec, index, up_id, *outcomes[up_id])
            else:  # gone from memory while this task was being stored: look it up
                waiting.add(up_id)
                self.spawn(self.fetch_upstream(rec, up_id))

    async def fetch_upstream(self, rec: TaskRecord, up_id: str) -> None:
        stored = await self.store.get(up_id)
        if stored is None or stored.outcome is None:
            return
        result = task_pb2.TaskResult.FromString(stored.outcome.result)
        self.upstream_final(rec, up_id, stored.outcome.state, result)

    def upstream_done(
        self, rec: TaskRecord, index: int, up_id: str, state: int, result: task_pb2.TaskResult
    ) -> None:
        edge = rec.spec.depends_on[index]
        if state != SUCCEEDED and not edge.run_on_failure and not rec.skip_reason:
            rec.skip_reason = f"upstream task {up_id} ended {state_name(state)}"
        assert rec.upstream_results is not None  # made by _link
        rec.upstream_results[up_id] = result

    def upstream_final(
        self, rec: TaskRecord, up_id: str, state: int, result: task_pb2.TaskResult
    ) -> None:
        """An upstream task of `rec` reached a durable outcome: release or skip `rec`."""
        if is_final(rec.state) or not rec.waiting_on or up_id not in rec.waiting_on:
            return
        for index, candidate in enumerate(rec.upstream):
            if candidate == up_id:
                self.upstream_done(rec, index, up_id, state, result)
        rec.waiting_on.discard(up_id)
        if rec.skip_reason:
            self.finish(rec, SKIPPED, task_pb2.TaskResult(error=rec.skip_reason), by=COORDINATOR)
        elif not rec.waiting_on:
            self.admit(rec)
            self.events.emit(task_change(rec, by=COORDINATOR))

    async def outcomes_of(
        self, records: Sequence[TaskRecord], exclude: frozenset[str] | set[str] = frozenset()
    ) -> dict[str, tuple[int, task_pb2.TaskResult]]:
        """(state, result) of the final upstream tasks of `records` that are not in memory."""
        out: dict[str, tuple[int, task_pb2.TaskResult]] = {}
        for rec in records:
            for up in rec.upstream:
                if up in self.tasks or up in exclude or up in out:
                    continue
                stored = await self.store.get(up)
                if stored is not None and stored.outcome is not None:
                    result = task_pb2.TaskResult.FromString(stored.outcome.result)
                    out[up] = (stored.outcome.state, result)
        return out

    def descendants(self, task_id: str) -> list[TaskRecord]:
        """Every task waiting, directly or not, on `task_id`."""
        out: list[TaskRecord] = []
        seen = {task_id}
        frontier = [task_id]
        while frontier:
            for dependent in self.dependents.get(frontier.pop(), ()):
                if dependent not in seen and (rec := self.tasks.get(dependent)) is not None:
                    seen.add(dependent)
                    out.append(rec)
                    frontier.append(dependent)
        return out

    def finish(
        self, rec: TaskRecord, state: int, result: task_pb2.TaskResult, *, by: str = ""
    ) -> None:
        """Make a task final now; its outcome is committed with the next group of outcomes."""
        if rec.state == QUEUED:
            self.scheduler.queue.remove(rec)
        if not is_final(rec.state):
            self.unfinished[rec.tenant] -= 1
        if by:
            rec.finished_by = by
        self.timers.cancel(TimerKind.RELEASE, rec.id)
        self.timers.cancel(TimerKind.QUEUE_TIMEOUT, rec.id)
        rec.state = state
        rec.result = result
        rec.finished_at = self.wall()
        rec.final_seq = self.events.reserve()
        if not self.to_finish:
            asyncio.get_running_loop().call_soon(self.flush_finished)
        self.to_finish.append(rec)

    def flush_finished(self) -> None:
        batch, self.to_finish = self.to_finish, []
        if not batch:
            return
        self.save_usage()
        if self.recorder is not None:  # the store fails to commit: these wait their turn
            self.events.abandon(rec.final_seq for rec in batch)
            self.unrecorded += batch
        else:
            self.spawn(self.commit_finished(batch))

    async def commit_finished(self, batch: list[TaskRecord]) -> None:
        rows = [finished_row(rec, self.epoch) for rec in batch]
        try:
            await self.store.finish(rows)
        except Exception as err:
            # Their numbers go, so later events flow: each try numbers them anew.
            self.events.abandon(rec.final_seq for rec in batch)
            self.store_error = getattr(err, "message", "") or repr(err)
            if not self.accepting:  # stopping: they run again after the restart
                _log.error("failed to record %d outcomes: %s", len(batch), self.store_error)
                return
            self.unrecorded += batch
            if self.recorder is None:
                _log.error(
                    "failed to record %d outcomes: %s; retrying until the store can write",
                    len(batch),
                    self.store_error,
                )
                self.recorder = asyncio.create_task(self.record_again(), name="shoal-recorder")
            return
        self.recorded(batch)

    async def record_again(self) -> None:
        """Commit the outcomes whose commit failed, with backoff, until the store takes them
        all: a node's report is never dropped. Reads and dispatch go on meanwhile."""
        tries = 0
        try:
            while self.unrecorded:  # more may come while a try runs
                async for attempt in AsyncRetrying(wait=wait_exponential_jitter(0.05, 2.0)):
                    with attempt:
                        tries += 1
                        batch, self.unrecorded = self.unrecorded, []
                        self.renumber(batch)
                        try:
                            await self.store.finish([finished_row(r, self.epoch) for r in batch])
                        except BaseException as err:
                            self.events.abandon(rec.final_seq for rec in batch)
                            self.unrecorded[:0] = batch
                            self.store_error = getattr(err, "message", "") or repr(err)
                            raise
                        self.recorded(batch)
        finally:
            self.recorder = None
        self.store_error = ""
        _log.info("outcomes recorded again after %d tries: the store can write", tries)

    def renumber(self, batch: list[TaskRecord]) -> None:
        """New event numbers for outcomes tried again (their old ones were abandoned)."""
        for rec in batch:
            rec.final_seq = self.events.reserve()

    def recorded(self, batch: list[TaskRecord]) -> None:
        """Outcomes are committed: publish them, wake waiters, release dependents."""
        self.events.publish(
            task_change(rec, by=rec.finished_by, seq=rec.final_seq) for rec in batch
        )
        cap = self.options.finished_cache
        for rec in batch:
            self.finished_count[rec.state] += 1
            rec.durable = True
            for fut in rec.waiters or ():
                if not fut.done():
                    fut.set_result(None)
            rec.waiters = None
            self.finished.append(rec.id)
            for dependent in self.dependents.pop(rec.id, ()):
                if (down := self.tasks.get(dependent)) is not None:
                    self.upstream_final(down, rec.id, rec.state, rec.result or NO_RESULT)
        while len(self.finished) > cap:
            self.tasks.pop(self.finished.popleft(), None)

    def requeue(self, rec: TaskRecord) -> None:
        """Queue an attempt that ended without an outcome again, ahead of its tenant's queue."""
        rec.state = QUEUED
        rec.node_id = ""
        rec.started_at = None
        self.scheduler.queue.push_front(rec)
        self.events.emit(task_change(rec, by=COORDINATOR))

    def record_attempt(self, rec: TaskRecord, state: int, result: task_pb2.TaskResult) -> None:
        attempt = task_pb2.Attempt(
            id=attempt_id(rec),
            node_id=rec.node_id,
            state=state,  # type: ignore[arg-type]
            result=result,
            started_at=timestamp(rec.started_at),
            finished_at=timestamp(self.wall()),
        )
        rec.attempts = (*rec.attempts, attempt)

    def after_failure(
        self, rec: TaskRecord, state: int, result: task_pb2.TaskResult, *, by: str
    ) -> None:
        """An attempt ended: final, or (per its retry policy) tried again after a backoff."""
        delay = None
        if state != SUCCEEDED:
            made = len(rec.attempts) + 1
            delay = retry_delay(rec.spec.retry, made, state, result, self.rng)
        if delay is None:
            self.finish(rec, state, result, by=by)
            return
        self.record_attempt(rec, state, result)
        rec.node_id = ""
        rec.started_at = None
        rec.release_at = self.wall() + delay  # shown in pending_reason
        rec.state = PENDING
        self.set_timer(TimerKind.RELEASE, rec.id, self.time.now() + delay)
        self.events.emit(task_change(rec, by=by))

    def save_usage(self) -> None:
        """Usage counted since the last save goes to the store: a row per key and period."""
        if usage := self.quotas.unsaved():
            self.spawn(self.store.add_usage(usage))
