"""The coordinator's core: accepts, stores, schedules and tracks tasks. No gRPC in here."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import random
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from tenacity import AsyncRetrying, wait_exponential_jitter

from shoal._output import output_size
from shoal.auth import COORDINATOR, Principal
from shoal.coordinator.admission import Admission, Refusal, Waiting
from shoal.coordinator.backpressure import Backpressure
from shoal.coordinator.breakers import (
    CLOSED,
    OPEN,
    Breaker,
    Breakers,
    backend_key,
    executor_key,
    node_key,
)
from shoal.coordinator.clock import Clock
from shoal.coordinator.encoding import (
    attempt_id,
    finished_row,
    live_task,
    stored_event,
    stored_task,
    task_change,
    task_record,
    task_row,
)
from shoal.coordinator.events import Change, EventLog
from shoal.coordinator.locks import LeaseTable, LockGate
from shoal.coordinator.quotas import Pricing, QuotaGate, check_quota
from shoal.coordinator.ratelimit import TokenBucket
from shoal.coordinator.records import TaskRecord
from shoal.coordinator.retries import retry_delay
from shoal.coordinator.routes import route
from shoal.coordinator.scheduler import (
    NodeSlots,
    Routing,
    Scheduler,
    fields_of,
    plain_requirements,
    requirements_of,
)
from shoal.coordinator.schedules import ScheduleBook
from shoal.coordinator.sessions import NodeSession, Pace
from shoal.coordinator.store import Request, Store, StoredTask, TaskRow, TokenRow
from shoal.coordinator.templates import render
from shoal.coordinator.timers import TimerKind, Timers
from shoal.coordinator.tokens import TokenRegistry
from shoal.coordinator.unplaceable import UnplaceableBook
from shoal.coordinator.validation import (
    Limits,
    bounded_result,
    check_hello,
    check_request_id,
    drop_unserved,
    validate_batch,
)
from shoal.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from shoal.specs import FINAL_STATES, is_final, state_name, timestamp, to_duration
from shoal.v1 import admin_pb2, locks_pb2, node_pb2, task_pb2

__all__ = ["SHUTTING_DOWN", "Coordinator", "CoreOptions", "Submitted"]

_log = logging.getLogger("shoal.coordinator")

_PENDING = task_pb2.TASK_STATE_PENDING
_QUEUED = task_pb2.TASK_STATE_QUEUED
_ASSIGNED = task_pb2.TASK_STATE_ASSIGNED
_RUNNING = task_pb2.TASK_STATE_RUNNING
_CANCELLED = task_pb2.TASK_STATE_CANCELLED
_FAILED = task_pb2.TASK_STATE_FAILED
_SUCCEEDED = task_pb2.TASK_STATE_SUCCEEDED
_SKIPPED = task_pb2.TASK_STATE_SKIPPED
_TIMED_OUT = task_pb2.TASK_STATE_TIMED_OUT
_NO_RESULT = task_pb2.TaskResult()
_REPLAY_PAGE = 1000
_PAGE_BYTES = 1 << 20  # of output in one page of a watch (one event at least)
_FREEZE_AFTER = 100_000  # tasks recovered
SHUTTING_DOWN = "the coordinator is shutting down: watch again from the last cursor received"


@dataclass(frozen=True)
class CoreOptions:
    """Tunables of the core; durations are timedelta."""

    limits: Limits = field(default_factory=Limits)
    heartbeat_interval: timedelta = timedelta(seconds=3)
    lease: timedelta = timedelta(seconds=10)
    # Beyond this many heartbeats a second from all nodes together, new sessions heartbeat
    # less often, under leases longer in proportion (see Coordinator.pace).
    max_heartbeat_rate: float = 500.0
    event_capacity: int = 100_000
    event_bytes: int = 64 << 20  # of output events held in memory (the oldest go first)
    finished_cache: int = 10_000
    node_message_rate: float = 2000.0
    node_message_burst: int = 4000
    routing: Routing = Routing.LEAST_LOADED  # for tasks that name no strategy
    tenant_weights: Mapping[str, float] = field(default_factory=dict)
    restart_grace: timedelta | None = None  # None: a lease
    # How long a task no connected node could ever run waits for one before it fails (unless
    # its spec says wait_for_node).
    unplaceable_grace: timedelta = timedelta(seconds=5)
    pricing: Pricing = field(default_factory=dict)  # model -> $ per 1M prompt/completion tokens
    quotas: Sequence[admin_pb2.Quota] = ()  # from configuration, on top of the stored ones
    breaker_threshold: int = 5
    breaker_cooldown: timedelta = timedelta(seconds=30)
    max_lock_ttl: timedelta = timedelta(hours=1)  # a lease's longest ttl at once
    max_catch_up: int = 10  # missed firings a CATCH_UP_ALL schedule runs at once


@dataclass(frozen=True, slots=True)
class Submitted:
    task_id: str
    created: bool
    seq: int


def _dispatched(recorded: Mapping[str, str]) -> dict[str, tuple[str, int, int]]:
    """(node id, epoch, number) by task from the store's node attempts; where two nodes were
    recorded with one task, the later attempt."""
    out: dict[str, tuple[str, int, int]] = {}
    for node_id, text in recorded.items():
        for line in text.splitlines():
            task_id, _, attempt = line.partition(" ")
            epoch, _, number = attempt.partition(" ")
            if not (epoch.isdigit() and number.isdigit()):
                continue
            claim = (node_id, int(epoch), int(number))
            if (old := out.get(task_id)) is None or old[1:] < claim[1:]:
                out[task_id] = claim
    return out


def _log_failure(done: asyncio.Future[None]) -> None:
    if not done.cancelled() and (err := done.exception()) is not None:
        _log.error("failed to record the attempts dispatched: %s", err)


def _hidden(by: Principal, tenant: str) -> bool:
    """Whether `tenant`'s tasks are out of `by`'s sight: to it they do not exist (NOT_FOUND, as
    for an unknown id, so ids of other tenants cannot be probed)."""
    return bool(by.tenant) and tenant != by.tenant


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection inside (the collector runs again after, as it was)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class Coordinator:
    """Owns every live task, the event log and the node sessions."""

    def __init__(
        self,
        store: Store,
        options: CoreOptions | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.options = options or CoreOptions()
        self._pace = (-1, Pace(0.0, 0.0))  # for how many sessions, what pace
        self._store = store
        self.tokens = TokenRegistry(store, wall=wall)
        self._clock = clock
        self._wall = wall
        # Durations (timers, TTLs, cooldowns, buckets) on steady time; dates on the wall clock.
        self._time = Clock(monotonic=clock, wall=wall)
        self.epoch = 0
        self.events = EventLog(0)
        self.watchers_cut = 0  # watches ended because they fell behind the event log
        self._rng = rng or random.Random()
        self._scheduler = Scheduler(
            tenant_weights=self.options.tenant_weights,
            routing=self.options.routing,
            rng=self._rng,
        )
        self._tasks: dict[str, TaskRecord] = {}
        self._finished: deque[str] = deque()
        self._sessions: dict[str, NodeSession] = {}
        # Nodes known by other means than their session (mDNS), by node id, with their health:
        # ListNodes shows them too. The server sets it when it watches the LAN.
        self.discovered: Callable[[], Mapping[str, admin_pb2.NodeStatus]] = dict
        self._to_finish: list[TaskRecord] = []
        # Outcomes whose commit failed (a full disk), retried by `_recorder` until one lands:
        # shown unfinished meanwhile, as after a restart they would be.
        self._unrecorded: list[TaskRecord] = []
        self._recorder: asyncio.Task[None] | None = None
        self._store_error = ""  # why the last outcome commit failed, while it is retried
        self._dispatch_pending = False
        self._background: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._timers = Timers()
        self._timer_loop: asyncio.Task[None] | None = None
        self._timer_wake: asyncio.Event | None = None
        self._dependents: dict[str, list[str]] = {}  # upstream id -> ids waiting on it
        self._unfinished: Counter[str] = Counter()  # per tenant, for backpressure
        self._backpressure = Backpressure(
            self.options.limits,
            self._unfinished,
            clock=clock,
            finished=lambda: self.finished_count.total(),
            rng=self._rng,
        )
        self._breakers = Breakers(
            threshold=self.options.breaker_threshold,
            cooldown=self.options.breaker_cooldown.total_seconds(),
            clock=self._time.now,
            wall=wall,
        )
        self.quotas = QuotaGate(pricing=self.options.pricing, clock=self._time.now)
        self.locks = LockGate()
        self._gates: list[Admission] = [self.quotas, self.locks]
        self._leases = LeaseTable(
            store,
            self.locks,
            set_timer=self._set_timer,
            cancel_timer=self._timers.cancel,
            spawn=self._spawn,
            wake=self._wake,
            clock=self._time,
            max_name=self.options.limits.max_string,
            max_ttl=self.options.max_lock_ttl,
        )
        self._schedules = ScheduleBook(
            store,
            tasks=self._tasks,
            submit=lambda specs, by: self.submit(specs, by=by),
            set_timer=self._set_timer,
            cancel_timer=self._timers.cancel,
            spawn=self._spawn,
            clock=self._time,
            limits=self.options.limits,
            max_catch_up=self.options.max_catch_up,
        )
        self._waiting = Waiting()  # tasks a gate holds back, by key
        self._unplaceable = UnplaceableBook(
            self._scheduler, grace=self.options.unplaceable_grace.total_seconds()
        )
        self._limited: set[str] = set()  # keys holding tasks back now
        self.finished_count: Counter[int] = Counter()  # outcomes by state, for metrics
        # After a restart: recovered tasks that may still run on a node that has yet to
        # reconnect, and the nodes that held a session when the coordinator last ran.
        self._recovering: set[str] = set()
        self._awaited: set[str] = set()
        # Who ran what when the coordinator last ran, as recorded: (node id, epoch, number)
        # by task. Only that node may reclaim that attempt after a restart.
        self._dispatched: dict[str, tuple[str, int, int]] = {}
        self._moved: set[str] = set()  # nodes whose attempts changed since last recorded
        self.accepting = False

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store, start a new epoch and queue every unfinished task again."""
        self.epoch = await self._store.open()
        await self.tokens.load()
        self.events = EventLog(
            self.epoch, capacity=self.options.event_capacity, max_bytes=self.options.event_bytes
        )
        with _collector_paused():  # a million new objects would set off full collections
            await self._recover()
            if len(self._tasks) >= _FREEZE_AFTER:
                # The collector would walk every record once it runs again, and at each full
                # collection after: what lives now is kept out of its collections for good.
                gc.freeze()
        for body in await self._store.quotas():
            self.quotas.set(admin_pb2.Quota.FromString(body))
        for quota in self.options.quotas:
            check_quota(quota, self.options.limits.max_string)
            self.quotas.set(quota)
        self.quotas.restore(await self._store.usage())
        await self._leases.load()
        await self._schedules.load()
        self._timer_wake = asyncio.Event()
        self._timer_loop = asyncio.create_task(self._run_timers(), name="shoal-timers")
        self._sweeper = asyncio.create_task(self._sweep_leases(), name="shoal-lease-sweeper")
        self.accepting = True
        _log.info("coordinator started epoch=%d recovered=%d", self.epoch, len(self._tasks))

    async def _recover(self) -> None:
        """Queue every unfinished task of the store again (or hold it for its node: attach)."""
        records = []
        tasks, unfinished = self._tasks, self._unfinished
        names: dict[str, str] = {}  # one string per submitter or tenant, not one per task
        async for rows in self._store.unfinished():
            for seq, task_id, spec_bytes, created_at, by, depends_on, key, prio, tenant in rows:
                by = names.setdefault(by, by)
                if key is not None:  # nothing unusual: no need to parse its spec
                    req = plain_requirements(key)
                    tenant = names.setdefault(tenant, tenant)
                    rec = TaskRecord(task_id, seq, spec_bytes, prio, req, tenant, created_at, by)
                else:
                    spec = task_pb2.TaskSpec.FromString(spec_bytes)
                    rec = task_record(task_id, seq, spec, spec_bytes, created_at, by)
                    if depends_on:
                        rec.upstream = depends_on
                tasks[rec.id] = rec
                unfinished[rec.tenant] += 1
                records.append(rec)
        # Only records with a rare field set (`more`) can have upstream tasks to link.
        linked = [rec for rec in records if rec.more is not None]
        outcomes = await self._outcomes_of(linked)
        for rec in linked:
            self._link(rec, outcomes)
        self._awaited = set(await self._store.members())
        self._dispatched = _dispatched(await self._store.node_attempts())
        grace = (self.options.restart_grace or self.options.lease).total_seconds()
        now = self._wall()
        if self._awaited:  # no task fails for want of a node before those nodes had their time
            self._unplaceable.hold_until = now + grace
        for rec in records:
            if rec.more is not None and rec.queue_timeout is not None:
                deadline = rec.created_at + rec.queue_timeout  # stored as wall time
                rec.queue_deadline = self._time.remaining(deadline, most=rec.queue_timeout)
            if self._awaited and grace > 0 and not rec.waiting_on and (rec.release_at or 0) <= now:
                rec.state = _PENDING  # its node may still run it: see attach
                self._recovering.add(rec.id)
            else:
                self._admit(rec)
        if self._recovering:
            self._set_timer(TimerKind.RECOVERY, "", self._time.now() + grace)

    async def stop(self) -> None:
        """Refuse new work, end watches, close node sessions, flush outcomes, close the store;
        idempotent."""
        self.accepting = False
        self.events.close()  # open watches end now, not when the server's grace runs out
        for loop_task in (self._sweeper, self._timer_loop):
            if loop_task is not None:
                loop_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loop_task
        self._sweeper = self._timer_loop = None
        self._moved.update(self._sessions)  # a node that is back soon reclaims these
        try:
            await self._record_attempts()
        except Exception:  # its tasks run again after the restart instead
            _log.exception("failed to record the attempts nodes run")
        for session in list(self._sessions.values()):
            session.close()
        if self._recorder is not None:  # one last try below; then they run again after a restart
            self._recorder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recorder
        self._renumber(self._unrecorded)
        self._to_finish[:0], self._unrecorded = self._unrecorded, []
        self._flush_finished()
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self._store.close()

    # -- tasks -----------------------------------------------------------------------------

    async def submit(
        self,
        specs: Sequence[task_pb2.TaskSpec],
        *,
        by: Principal,
        single: bool = False,
        request_id: str = "",
        client: str = "",
    ) -> list[Submitted]:
        """Store the tasks atomically, then queue them; returns once they are durable.

        A principal with a tenant submits into it: a spec without tenant gets it, and a spec
        naming another tenant is refused. A `request_id` the same principal used before
        returns the tasks of that request and creates none. `client` names the caller's
        connection, for its place in line while the coordinator is full.
        """
        if not self.accepting:
            raise Unavailable("the coordinator is not accepting tasks")
        if by.tenant:
            for spec in specs:
                by.check_tenant(spec.tenant or by.tenant, f"tenant {spec.tenant!r}")
                spec.tenant = by.tenant
        # Each spec is serialized (for its row) and its fields listed once, for all that follows.
        encoded = [spec.SerializeToString() for spec in specs]
        fields = [fields_of(spec) for spec in specs]
        validate_batch(specs, self.options.limits, single=single, encoded=encoded, fields=fields)
        check_request_id(request_id, self.options.limits)
        # Counted as unfinished from here, before any await: concurrent submits see each other.
        reserved = self._backpressure.reserve(
            specs, waiter=f"{by.name}\0{client}" if client else ""
        )
        records: list[TaskRecord] = []
        rows: list[TaskRow] = []
        try:
            await self._check_upstream_ids(specs, by)
            now = self._wall()
            steady = self._time.now()
            # A task id is its acceptance number's low 32 bits, then 32 random ones: unique,
            # and in order, so the store's index of ids grows at its end (random ids cost 3x).
            noise = os.urandom(4 * len(specs)).hex()  # one call for the batch
            for i, spec in enumerate(specs):
                seq = self.events.reserve()
                task_id = f"{seq & 0xFFFFFFFF:08x}{noise[8 * i : 8 * i + 8]}"
                rec = task_record(task_id, seq, spec, encoded[i], now, by.name, fields[i])
                if rec.more is not None and rec.queue_timeout is not None:
                    rec.queue_deadline = steady + rec.queue_timeout
                records.append(rec)
                rows.append(task_row(rec, spec))
            # Steady time: a wall-clock step neither ends nor stretches the dedupe window.
            request = Request(f"{by.name}\0{request_id}", steady) if request_id else None
            existing, upstream = await self._store.insert(rows, request)
            created = [r for r, old in zip(records, existing, strict=True) if old is None]
            for rec, ups in zip(records, upstream, strict=True):
                if ups:  # else the shared empty one: most tasks have no upstream
                    rec.upstream = ups
            outcomes = await self._outcomes_of(created, exclude={r.id for r in created})
        except BaseException:
            self._backpressure.release(reserved)
            self.events.abandon(r.seq for r in records)
            raise
        # From here on nothing awaits: upstream tasks cannot finish between linking and queueing.
        out: list[Submitted] = []
        for rec, old in zip(records, existing, strict=True):
            if old is not None:
                self.events.abandon((rec.seq,))
                self._unfinished[rec.tenant] -= 1  # reserved, but an existing task's key
                out.append(Submitted(old, False, 0))
            else:
                self._tasks[rec.id] = rec
                out.append(Submitted(rec.id, True, rec.seq))
        accepted = []
        now_ns = time.time_ns()  # one for the batch, held by each of its events
        for rec in created:
            self._link(rec, outcomes)
            self._admit(rec)
            change = task_change(rec, by=rec.submitted_by, seq=rec.seq, time_ns=now_ns)
            if is_final(change.state):  # skipped at once: its outcome is its own, later event
                change.state = _PENDING
                change.result = None
            accepted.append(change)
        self.events.publish(accepted)
        return out

    async def _check_upstream_ids(self, specs: Sequence[task_pb2.TaskSpec], by: Principal) -> None:
        """Every upstream named by id exists and is visible to the submitter (another
        tenant's task is answered as one that does not exist)."""
        for i, spec in enumerate(specs):
            for j, dep in enumerate(spec.depends_on):
                if not dep.HasField("task_id"):
                    continue
                tenant = None
                if (live := self._tasks.get(dep.task_id)) is not None:
                    tenant = live.tenant
                elif (stored := await self._store.get(dep.task_id)) is not None:
                    tenant = stored.row.tenant
                if tenant is None or _hidden(by, tenant):
                    raise InvalidArgument(
                        f"specs[{i}].depends_on[{j}]: no task {dep.task_id!r}",
                        [FieldViolation(f"specs[{i}].depends_on[{j}]", "no such task")],
                    )

    async def _outcomes_of(
        self, records: Sequence[TaskRecord], exclude: frozenset[str] | set[str] = frozenset()
    ) -> dict[str, tuple[int, task_pb2.TaskResult]]:
        """(state, result) of the final upstream tasks of `records` that are not in memory."""
        out: dict[str, tuple[int, task_pb2.TaskResult]] = {}
        for rec in records:
            for up in rec.upstream:
                if up in self._tasks or up in exclude or up in out:
                    continue
                stored = await self._store.get(up)
                if stored is not None and stored.outcome is not None:
                    result = task_pb2.TaskResult.FromString(stored.outcome.result)
                    out[up] = (stored.outcome.state, result)
        return out

    def _link(self, rec: TaskRecord, outcomes: dict[str, tuple[int, task_pb2.TaskResult]]) -> None:
        """Note which upstream tasks `rec` waits for, and the results of those already final."""
        if not rec.upstream:
            return
        waiting: set[str] = set()
        rec.waiting_on, rec.upstream_results = waiting, {}
        for index, up_id in enumerate(rec.upstream):
            up = self._tasks.get(up_id)
            if up is not None and not (up.durable and up.result is not None):
                waiting.add(up_id)
                self._dependents.setdefault(up_id, []).append(rec.id)
            elif up is not None and up.result is not None:
                self._upstream_done(rec, index, up_id, up.state, up.result)
            elif up_id in outcomes:
                self._upstream_done(rec, index, up_id, *outcomes[up_id])
            else:  # gone from memory while this task was being stored: look it up
                waiting.add(up_id)
                self._spawn(self._fetch_upstream(rec, up_id))

    async def _fetch_upstream(self, rec: TaskRecord, up_id: str) -> None:
        stored = await self._store.get(up_id)
        if stored is None or stored.outcome is None:
            return
        result = task_pb2.TaskResult.FromString(stored.outcome.result)
        self._upstream_final(rec, up_id, stored.outcome.state, result)

    def _upstream_done(
        self, rec: TaskRecord, index: int, up_id: str, state: int, result: task_pb2.TaskResult
    ) -> None:
        edge = rec.spec.depends_on[index]
        if state != _SUCCEEDED and not edge.run_on_failure and not rec.skip_reason:
            rec.skip_reason = f"upstream task {up_id} ended {state_name(state)}"
        assert rec.upstream_results is not None  # made by _link
        rec.upstream_results[up_id] = result

    def _upstream_final(
        self, rec: TaskRecord, up_id: str, state: int, result: task_pb2.TaskResult
    ) -> None:
        """An upstream task of `rec` reached a durable outcome: release or skip `rec`."""
        if is_final(rec.state) or not rec.waiting_on or up_id not in rec.waiting_on:
            return
        for index, candidate in enumerate(rec.upstream):
            if candidate == up_id:
                self._upstream_done(rec, index, up_id, state, result)
        rec.waiting_on.discard(up_id)
        if rec.skip_reason:
            self._finish(rec, _SKIPPED, task_pb2.TaskResult(error=rec.skip_reason), by=COORDINATOR)
        elif not rec.waiting_on:
            self._admit(rec)
            self.events.emit(task_change(rec, by=COORDINATOR))

    def _admit(self, rec: TaskRecord) -> None:
        """Queue a task whose upstream tasks are done and whose time has come; else PENDING."""
        if rec.more is None:  # no upstream, no time to wait for, no route to choose: queued
            rec.state = _QUEUED
            self._scheduler.queue.push(rec)
            self._kick()
            return
        if rec.skip_reason and not rec.waiting_on:
            self._finish(rec, _SKIPPED, task_pb2.TaskResult(error=rec.skip_reason), by=COORDINATOR)
            return
        now = self._wall()
        if rec.queue_deadline is not None and rec.attempt == 0 and not rec.attempts:
            self._set_timer(TimerKind.QUEUE_TIMEOUT, rec.id, rec.queue_deadline)
        if rec.waiting_on or (rec.release_at is not None and rec.release_at > now):
            rec.state = _PENDING
            if rec.release_at is not None and not rec.waiting_on:  # not_before: a date
                self._set_timer(TimerKind.RELEASE, rec.id, rec.release_at, calendar=True)
            return
        rec.release_at = None
        if rec.routed:
            self._choose_route(rec)
        rec.state = _QUEUED
        self._scheduler.queue.push(rec)
        self._kick()

    def _choose_route(self, rec: TaskRecord) -> None:
        """An llm task with routes takes the first one it can run by now (see LlmSpec)."""
        spec = route(rec.spec, self._route_viable)
        if spec.llm.provider != rec.spec.llm.provider or spec.llm.model != rec.spec.llm.model:
            _log.info("task=%s routed to %s:%s", rec.id, spec.llm.provider, spec.llm.model)
        rec.spec, rec.backend = spec, spec.backend
        rec.placement = requirements_of(spec)

    def _route_viable(self, spec: task_pb2.TaskSpec) -> bool:
        """Whether a connected node runs `spec` with no breaker open on the way, within budget."""
        cls = requirements_of(spec).cls
        if not any(
            cls.fits(n) and self._breakers.passes(node_key(n.node_id))
            for n in self._scheduler.nodes.values()
        ):
            return False
        if spec.backend and not self._breakers.passes(backend_key(spec.backend)):
            return False
        return not self.quotas.spent(spec, self._wall())

    async def get(self, task_id: str, *, by: Principal) -> task_pb2.Task:
        rec = self._live(task_id, by)
        if rec is not None:
            return self._task_proto(rec)
        return stored_task(await self._stored(task_id, by))

    def _live(self, task_id: str, by: Principal) -> TaskRecord | None:
        rec = self._tasks.get(task_id)
        if rec is not None and _hidden(by, rec.tenant):
            raise NotFound(f"no task {task_id!r}")
        return rec

    async def _stored(self, task_id: str, by: Principal) -> StoredTask:
        if not task_id:
            raise InvalidArgument("task_id is required")
        stored = await self._store.get(task_id)
        if stored is None or _hidden(by, stored.row.tenant):
            raise NotFound(f"no task {task_id!r}")
        return stored

    async def wait(
        self, task_id: str, timeout: timedelta | None, *, by: Principal
    ) -> task_pb2.Task:
        """The task once its outcome is durable, or as it is when `timeout` passes."""
        rec = self._live(task_id, by)
        if rec is None:
            return stored_task(await self._stored(task_id, by))
        if not rec.durable:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            if rec.waiters is None:
                rec.waiters = []
            rec.waiters.append(fut)
            try:
                seconds = None if timeout is None else timeout.total_seconds()
                await asyncio.wait_for(asyncio.shield(fut), seconds)
            except TimeoutError:
                pass
            finally:
                if rec.waiters and fut in rec.waiters:
                    rec.waiters.remove(fut)
        return self._task_proto(rec)

    async def cancel(self, task_id: str, *, by: Principal) -> task_pb2.Task:
        """Cancel a task: at once when queued; a running one is killed by its node."""
        rec = self._live(task_id, by)
        if rec is None:
            stored = await self._stored(task_id, by)
            if stored.outcome is None:
                raise FailedPrecondition(f"task {task_id!r} is not held by this coordinator")
            return stored_task(stored)
        if is_final(rec.state):
            return self._task_proto(rec)
        self._cancel_one(rec, by.name, "cancelled")
        for dependent in self._descendants(rec.id):
            self._cancel_one(dependent, by.name, f"cancelled with upstream task {rec.id}")
        if is_final(rec.state):
            return await self.wait(task_id, None, by=by)
        return self._task_proto(rec)

    def _cancel_one(self, rec: TaskRecord, by: str, why: str) -> None:
        """Waiting tasks end at once; a running one is killed by its node, which reports it."""
        if is_final(rec.state):
            return
        rec.finished_by = by
        if rec.state in (_PENDING, _QUEUED):
            self._finish(rec, _CANCELLED, task_pb2.TaskResult(error=f"{why} before it started"))
            return
        rec.cancel_requested = True
        session = self._sessions.get(rec.node_id)
        if session is not None:
            session.cancel(rec.id, attempt_id(rec))

    def _descendants(self, task_id: str) -> list[TaskRecord]:
        """Every task waiting, directly or not, on `task_id`."""
        out: list[TaskRecord] = []
        seen = {task_id}
        frontier = [task_id]
        while frontier:
            for dependent in self._dependents.get(frontier.pop(), ()):
                if dependent not in seen and (rec := self._tasks.get(dependent)) is not None:
                    seen.add(dependent)
                    out.append(rec)
                    frontier.append(dependent)
        return out

    async def list_tasks(
        self,
        *,
        states: Sequence[int],
        tenant: str,
        limit: int,
        page_token: str,
        by: Principal,
    ) -> tuple[list[task_pb2.Task], str]:
        """Tasks newest first, filtered by state and tenant; paged by an opaque token."""
        tenant = by.scoped_tenant(tenant)
        limit = min(max(limit or 100, 1), 1000)
        before: int | None = None
        if page_token:
            try:
                before = int(page_token)
            except ValueError:
                before = -1
            if not 0 < before < 1 << 63:
                raise InvalidArgument(f"bad page_token {page_token[:64]!r}")
        wanted = set(states)
        unknown = wanted - set(task_pb2.TaskState.values())
        if unknown:
            raise InvalidArgument(f"unknown states {sorted(unknown)}")
        finals = [s for s in wanted if s in FINAL_STATES] if wanted else None
        include_live = not wanted or bool(wanted - FINAL_STATES)
        stored = await self._store.list_tasks(
            before_seq=before,
            tenant=tenant or None,
            final_states=finals,
            include_unfinished=include_live,
            limit=limit,
        )
        tasks: list[task_pb2.Task] = []
        for st in stored:
            rec = self._tasks.get(st.row.id)
            task = self._task_proto(rec) if rec is not None else stored_task(st)
            if not wanted or task.state in wanted:
                tasks.append(task)
        token = str(stored[-1].row.seq) if len(stored) == limit else ""
        return tasks, token

    async def watch(
        self,
        *,
        since: int | None,
        task_ids: Sequence[str] = (),
        output: bool = False,
        tenant: str = "",
        states: Sequence[int] = (),
        by: Principal,
    ) -> AsyncIterator[tuple[int, list[task_pb2.Event]]]:
        """(cursor, events) after `since`: from the store when no longer in memory, then live.
        With `states`, only tasks' changes into those states (no notices).

        The first item has no events and gives the starting cursor.
        """
        tenant = by.scoped_tenant(tenant)
        if len(task_ids) > self.options.limits.max_watch_tasks:
            raise InvalidArgument(
                f"watch at most {self.options.limits.max_watch_tasks} task ids at once"
            )
        ids = frozenset(task_ids)
        cursor = self.events.last_seq if since is None else since

        wanted = frozenset(states)

        def keep(c: Change | None) -> bool:
            return (
                c is not None
                and (not ids or c.task_id in ids)
                and (output or c.output is None)
                and (not tenant or c.tenant == tenant)
                and (not wanted or (c.state in wanted and bool(c.task_id)))
            )

        yield cursor, []
        while True:
            if not self.tokens.valid(by):
                raise Unauthenticated(f"the token of {by.name!r} was revoked or has expired")
            if self.events.closed:
                raise Unavailable(SHUTTING_DOWN)
            held = self.events.after(cursor, _REPLAY_PAGE)
            if held is None:
                upto = self.events.oldest_seq
                items = await self._store.events_between(cursor, upto, _REPLAY_PAGE)
                if not items:
                    cursor = upto - 1
                    continue
                cursor = items[-1][0]
                replayed = [Change.of(stored_event(seq, st)) for seq, st in items]
                batch = [c for c in replayed if keep(c)]
            else:
                if not held:
                    await self.events.wait_after(cursor)
                    continue
                cursor += len(held)
                batch = [c for c in held if keep(c)]  # type: ignore[misc]
            # At most _REPLAY_PAGE events a page, and about _PAGE_BYTES of output.
            page: list[task_pb2.Event] = []
            size = 0
            for c in batch:
                page.append(c.event())
                if c.output is not None:
                    size += output_size(c.output)
                    if size >= _PAGE_BYTES:
                        yield page[-1].seq, page
                        page, size = [], 0
            if page:
                yield cursor, page

    # -- outcomes --------------------------------------------------------------------------

    def _finish(
        self, rec: TaskRecord, state: int, result: task_pb2.TaskResult, *, by: str = ""
    ) -> None:
        """Make a task final now; its outcome is committed with the next group of outcomes."""
        if rec.state == _QUEUED:
            self._scheduler.queue.discard()
        if not is_final(rec.state):
            self._unfinished[rec.tenant] -= 1
        if by:
            rec.finished_by = by
        self._timers.cancel(TimerKind.RELEASE, rec.id)
        self._timers.cancel(TimerKind.QUEUE_TIMEOUT, rec.id)
        rec.state = state
        rec.result = result
        rec.finished_at = self._wall()
        rec.final_seq = self.events.reserve()
        if not self._to_finish:
            asyncio.get_running_loop().call_soon(self._flush_finished)
        self._to_finish.append(rec)

    def _flush_finished(self) -> None:
        batch, self._to_finish = self._to_finish, []
        if not batch:
            return
        self._save_usage()
        if self._recorder is not None:  # the store fails to commit: these wait their turn
            self.events.abandon(rec.final_seq for rec in batch)
            self._unrecorded += batch
        else:
            self._spawn(self._commit_finished(batch))

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _commit_finished(self, batch: list[TaskRecord]) -> None:
        rows = [finished_row(rec, self.epoch) for rec in batch]
        try:
            await self._store.finish(rows)
        except Exception as err:
            # Their numbers go, so later events flow: each try numbers them anew.
            self.events.abandon(rec.final_seq for rec in batch)
            self._store_error = getattr(err, "message", "") or repr(err)
            if not self.accepting:  # stopping: they run again after the restart
                _log.error("failed to record %d outcomes: %s", len(batch), self._store_error)
                return
            self._unrecorded += batch
            if self._recorder is None:
                _log.error(
                    "failed to record %d outcomes: %s; retrying until the store can write",
                    len(batch),
                    self._store_error,
                )
                self._recorder = asyncio.create_task(self._record_again(), name="shoal-recorder")
            return
        self._recorded(batch)

    async def _record_again(self) -> None:
        """Commit the outcomes whose commit failed, with backoff, until the store takes them
        all: a node's report is never dropped. Reads and dispatch go on meanwhile."""
        tries = 0
        try:
            while self._unrecorded:  # more may come while a try runs
                async for attempt in AsyncRetrying(wait=wait_exponential_jitter(0.05, 2.0)):
                    with attempt:
                        tries += 1
                        batch, self._unrecorded = self._unrecorded, []
                        self._renumber(batch)
                        try:
                            await self._store.finish([finished_row(r, self.epoch) for r in batch])
                        except BaseException as err:
                            self.events.abandon(rec.final_seq for rec in batch)
                            self._unrecorded[:0] = batch
                            self._store_error = getattr(err, "message", "") or repr(err)
                            raise
                        self._recorded(batch)
        finally:
            self._recorder = None
        self._store_error = ""
        _log.info("outcomes recorded again after %d tries: the store can write", tries)

    def _renumber(self, batch: list[TaskRecord]) -> None:
        """New event numbers for outcomes tried again (their old ones were abandoned)."""
        for rec in batch:
            rec.final_seq = self.events.reserve()

    def _recorded(self, batch: list[TaskRecord]) -> None:
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
            self._finished.append(rec.id)
            for dependent in self._dependents.pop(rec.id, ()):
                if (down := self._tasks.get(dependent)) is not None:
                    self._upstream_final(down, rec.id, rec.state, rec.result or _NO_RESULT)
        while len(self._finished) > cap:
            self._tasks.pop(self._finished.popleft(), None)

    # -- dispatch --------------------------------------------------------------------------

    def _kick(self) -> None:
        if not self._dispatch_pending:
            self._dispatch_pending = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_pending = False
        by_node: dict[str, list[node_pb2.Assignment]] = {}
        lines: dict[str, list[str]] = {}  # "task epoch number" by node, for the store
        events: list[Change] = []
        gated = self._breakers.tripped > 0
        put_back = False
        gates = self.quotas.active
        for queued, slots in self._scheduler.schedule():
            rec: TaskRecord = queued  # type: ignore[assignment]
            rendered = None
            if rec.templated:
                rendered = self._rendered(rec, slots)
                if rendered is None:  # failed: its slot is free again
                    put_back = True
                    continue
            if (gates or rec.locks) and not self._through_gates(rec, slots):
                put_back = True  # its slot is free again: another task may take it
                continue
            if gated and not self._through_breakers(rec, slots):
                if gates or rec.locks:
                    self._give_back(rec, None)
                put_back = True
                continue
            session = self._sessions[slots.node_id]
            rec.state = _ASSIGNED
            rec.attempt += 1
            rec.attempt_epoch = self.epoch
            rec.node_id = session.node_id
            session.inflight[rec.id] = rec
            attempt = attempt_id(rec)
            assignment = node_pb2.Assignment(task_id=rec.id, attempt=attempt)
            if rendered is not None:
                assignment.spec.CopyFrom(rendered)
                session.assigned_bytes += rendered.ByteSize()
            else:  # straight from the stored bytes: no spec message kept for it
                assignment.spec.MergeFromString(rec.spec_bytes)
                session.assigned_bytes += len(rec.spec_bytes)
            by_node.setdefault(session.node_id, []).append(assignment)
            lines.setdefault(session.node_id, []).append(f"{rec.id} {self.epoch} {rec.attempt}")
            events.append(task_change(rec, by=COORDINATOR))
        for node_id, assignments in by_node.items():
            self._sessions[node_id].assign(assignments)
        if by_node:
            self._moved.update(by_node)
            self._record_dispatched({node_id: "\n".join(x) for node_id, x in lines.items()})
        for event in events:
            self.events.emit(event)
        if self._scheduler.queue.unoffered:
            # Its grace runs from when tasks were submitted (wall times, as created_at).
            for timer, due in self._unplaceable.found(self._wall()):
                self._set_timer(TimerKind.UNPLACEABLE, timer, due, calendar=True)
        if put_back:
            self._kick()  # what was put back may go elsewhere; what was held left room

    def _rendered(self, rec: TaskRecord, slots: NodeSlots) -> task_pb2.TaskSpec | None:
        """The spec of `rec` with its upstream values filled in; None when they are too large
        to send, and then `rec` has failed and its slot is free again."""
        results = rec.upstream_results or {}
        try:
            return render(
                rec.spec,
                [results.get(u, _NO_RESULT) for u in rec.upstream],
                limit=self.options.limits.max_rendered_spec_bytes,
            )
        except ResourceExhausted as err:
            # The task's own mistake (its references expand too far): it fails, and its node
            # never sees it.
            self._scheduler.release(slots, rec)
            rec.state = _PENDING  # out of the queue: see _finish
            error = f"RESOURCE_EXHAUSTED: {err.message} (max_rendered_spec_bytes)"
            self._finish(rec, _FAILED, task_pb2.TaskResult(error=error), by=COORDINATOR)
            return None

    # -- node sessions ---------------------------------------------------------------------

    def attach(
        self, hello: node_pb2.Hello, peer: str, *, by: Principal, adopted: bool = False
    ) -> NodeSession:
        """Start a node's session (`adopted`: one this coordinator dialled); a session already
        open under its id is replaced, whichever side dialled either.

        The attempts its Hello lists stay its own when they still are: the current attempt of a
        task assigned to it, or (after a restart) of a recovered task nobody else has run yet.
        It is told to stop the others.
        """
        info = hello.info
        if not info.node_id:
            raise InvalidArgument("hello.info.node_id is required")
        check_hello(hello, by, self.options.limits)
        if not self.accepting:
            raise Unavailable("the coordinator is shutting down")
        if dropped := drop_unserved(info):
            _log.warning(
                "node=%s offers no executor serving its %s: ignored",
                info.node_id,
                ",".join(dropped),
            )
        old = self._sessions.get(info.node_id)
        if old is not None:
            # It reconnected before its old stream was seen to end: what it still runs stays.
            _log.info("node=%s replaces its previous session", info.node_id)
            for running in hello.running:
                rec = old.inflight.get(running.task_id)
                if rec is not None and attempt_id(rec) == running.attempt:
                    del old.inflight[rec.id]
            self.detach(old)
        session = NodeSession(
            info,
            peer,
            by,
            TokenBucket(
                self.options.node_message_rate, self.options.node_message_burst, clock=self._clock
            ),
            now=self._clock(),
            wall=self._wall(),
            pace=self.pace(len(self._sessions) + 1),
            adopted=adopted,
        )
        self._sessions[info.node_id] = session
        for running in hello.running:
            rec = self._tasks.get(running.task_id)
            if rec is not None and self._reclaims(rec, session, running.attempt):
                self._moved.add(info.node_id)
                self._recovering.discard(rec.id)
                rec.attempt_epoch, rec.attempt = running.attempt.epoch, running.attempt.number
                rec.node_id = info.node_id
                if rec.state != _RUNNING:
                    rec.state = _RUNNING
                    rec.started_at = self._wall()
                    self.events.emit(task_change(rec, by=by.name))
                session.inflight[rec.id] = rec
                session.slots.take(rec.placement.cls.resources)
            elif rec is None or not (is_final(rec.state) and attempt_id(rec) == running.attempt):
                # (A result the node sends again, as it was recorded, needs no answer.)
                session.cancel(running.task_id, running.attempt)
        self._scheduler.add_node(session.slots)
        self._apply_node_state(info.node_id)
        if info.node_id not in self._awaited:
            self._spawn(self._store.set_member(info.node_id, True))
        else:
            self._awaited.discard(info.node_id)
            if not self._awaited:
                self._end_recovery()  # every node that was there is back
        _log.info(
            "node=%s joined peer=%s%s slots=%d executors=%s",
            info.node_id,
            peer,
            " (adopted)" if adopted else "",
            session.slots.slots,
            ",".join(info.executors),
        )
        self._kick()
        return session

    def _reclaims(self, rec: TaskRecord, session: NodeSession, attempt: task_pb2.AttemptId) -> bool:
        """Whether a node that reconnects still owns the attempt of `rec` it reports running:
        the attempt it was dispatched (in this epoch, or as recorded before a restart), of a
        task its Hello, and so its token, lets it run. Any other claim is refused."""
        if is_final(rec.state) or rec.cancel_requested:
            return False
        node_id = session.node_id
        if rec.node_id == node_id:  # assigned to it in this epoch and not lost since
            owned = (attempt.epoch, attempt.number) == (rec.attempt_epoch, rec.attempt) and (
                rec.state in (_ASSIGNED, _RUNNING)
            )
        elif rec.id in self._recovering:
            owned = self._dispatched.get(rec.id) == (node_id, attempt.epoch, attempt.number)
        else:
            owned = False
        if owned and not rec.placement.cls.fits(session.slots):
            _log.warning(
                "node=%s task=%s reclaim refused: the node may not run it", node_id, rec.id
            )
            return False
        return owned

    def _end_recovery(self) -> None:
        """The restart grace is over: recovered tasks no node reclaimed are queued."""
        self._timers.cancel(TimerKind.RECOVERY, "")
        recovering, self._recovering = self._recovering, set()
        self._awaited.clear()
        self._dispatched = {}
        for task_id in recovering:
            rec = self._tasks.get(task_id)
            if rec is not None and rec.state == _PENDING:
                self._admit(rec)
        if recovering:
            _log.info("restart grace over: %d recovered tasks queued", len(recovering))

    def detach(self, session: NodeSession) -> None:
        """End a node's session: its unfinished tasks are queued again with a new attempt."""
        if self._sessions.get(session.node_id) is not session:
            return
        del self._sessions[session.node_id]
        self._scheduler.remove_node(session.node_id)
        session.close()
        if self.accepting:  # not when the coordinator stops: it expects them back
            self._spawn(self._store.set_member(session.node_id, False))
        lost = [rec for rec in session.inflight.values() if not is_final(rec.state)]
        session.inflight.clear()
        if self.accepting:  # it may be back soon: no task fails for want of it meanwhile
            grace = (self.options.restart_grace or self.options.lease).total_seconds()
            self._unplaceable.hold(self._wall() + grace)
        if lost:
            # A node lost with work in flight is one infrastructure failure of the node.
            key = node_key(session.node_id)
            breaker = self._breakers.get(key)
            probe = breaker.probe if breaker is not None else ""
            for b in self._breakers.failed([key], probe, f"node {session.node_id} was lost"):
                self._breaker_changed(b)
        requeued = 0
        for rec in lost:
            self._end_attempt(rec, session.node_id, None)
            if rec.cancel_requested:
                self._finish(rec, _CANCELLED, task_pb2.TaskResult(error="cancelled; node left"))
                continue
            lost_result = task_pb2.TaskResult(
                error=f"node {session.node_id} was lost", infrastructure_failure=True
            )
            if rec.spec.retry.max_attempts:
                self._after_failure(rec, _FAILED, lost_result, by=COORDINATOR)
                continue
            # Without a retry policy a lost node never loses a task: it runs again at once.
            self._record_attempt(rec, _FAILED, lost_result)
            self._requeue(rec)
            requeued += 1
        _log.info("node=%s left requeued=%d", session.node_id, requeued)
        self._kick()

    def _requeue(self, rec: TaskRecord) -> None:
        """Queue an attempt that ended without an outcome again, ahead of its tenant's queue."""
        rec.state = _QUEUED
        rec.node_id = ""
        rec.started_at = None
        self._scheduler.queue.push_front(rec)
        self.events.emit(task_change(rec, by=COORDINATOR))

    def on_message(self, session: NodeSession, msg: node_pb2.NodeMessage) -> None:
        """Apply one message from a node."""
        session.last_seen = self._clock()
        kind = msg.WhichOneof("msg")
        if kind == "updates":
            self._on_updates(session, msg.updates.updates)
        elif kind == "heartbeat":
            # A node's view of its lease must stay well ahead: answered at least 4 times a lease.
            session.renew(msg.heartbeat.seq, session.last_seen, self.pace())
            if msg.heartbeat.draining != session.draining:
                session.draining = msg.heartbeat.draining
                self._apply_node_state(session.node_id)
            if session.note_load(msg.heartbeat):
                self._load_changed(session)
            loaded = msg.heartbeat.loaded_models
            if loaded != session.loaded_models and "ollama" in session.slots.executors:
                session.loaded_models = list(loaded[: self.options.limits.max_labels])
                session.slots.loaded_models = frozenset(session.loaded_models)
        elif kind == "hello":
            raise InvalidArgument("hello is only valid as the first message of a session")

    def _on_updates(self, session: NodeSession, updates: Sequence[node_pb2.TaskUpdate]) -> None:
        freed = False
        for u in updates:
            rec = session.inflight.get(u.task_id)
            kind = u.WhichOneof("update")
            if (
                rec is None
                or u.attempt.epoch != rec.attempt_epoch
                or u.attempt.number != rec.attempt
                or is_final(rec.state)
            ):
                # A stale attempt: fenced off; it changes nothing, and the node should stop it.
                session.stale_updates += 1
                if kind not in ("finished", "released"):
                    session.cancel(u.task_id, u.attempt)
                continue
            if kind == "started":
                rec.state = _RUNNING
                rec.started_at = self._wall()
                self.events.emit(task_change(rec, by=session.principal.name))
            elif kind == "output":
                output = u.output
                size = output_size(output)
                if size > self.options.limits.max_result_bytes:
                    output.data = output.data[: self.options.limits.max_result_bytes]
                    output.raw = output.raw[: self.options.limits.max_result_bytes]
                    size = output_size(output)
                change = task_change(rec, by=session.principal.name, output=output)
                self.events.emit(change, size=size)
            elif kind in ("finished", "released"):
                del session.inflight[rec.id]
                self._scheduler.release(session.slots, rec)
                freed = True
                if kind == "released":
                    # Given back unfinished by a draining node: no verdict, and not an attempt
                    # its retry policy counts (its number is not used again, for fencing).
                    self._end_attempt(rec, session.node_id, None)
                    if rec.cancel_requested:
                        self._finish(rec, _CANCELLED, task_pb2.TaskResult(error="cancelled"))
                    else:
                        self._requeue(rec)
                    continue
                state = u.finished.state
                result = bounded_result(u.finished.result, self.options.limits.max_result_bytes)
                if state not in FINAL_STATES:
                    state = _FAILED
                    result.error = result.error or f"node reported non-final state {state}"
                self._end_attempt(rec, session.node_id, result)
                if rec.cancel_requested:
                    self._finish(rec, state, result)
                else:
                    self._after_failure(rec, state, result, by=session.principal.name)
        if freed:
            self._moved.add(session.node_id)
            self._kick()

    # -- circuit breakers ------------------------------------------------------------------

    def _breaker_keys(self, rec: TaskRecord, node_id: str) -> tuple[str, ...]:
        keys = (node_key(node_id), executor_key(node_id, rec.placement.cls.executor))
        return (*keys, backend_key(rec.backend)) if rec.backend else keys

    def _end_attempt(
        self, rec: TaskRecord, node_id: str, result: task_pb2.TaskResult | None
    ) -> None:
        """An attempt ended (`result` None: without one, e.g. given back or lost): its verdict
        on its breakers, and what it took at dispatch given back."""
        # The common case costs two checks: no breaker has failures, no gate took anything.
        infra = result is not None and result.infrastructure_failure
        if self._breakers or infra:
            keys = self._breaker_keys(rec, node_id)
            if result is None:
                changed = self._breakers.abandoned(keys, rec.id)
            elif infra:
                changed = self._breakers.failed(keys, rec.id, result.error)
            else:
                changed = self._breakers.succeeded(keys, rec.id)
            for b in changed:
                self._breaker_changed(b)
        if self.quotas.active or rec.locks or (result is not None and result.HasField("usage")):
            self._give_back(rec, result)
        elif result is not None:  # usage by key counts every run: a tally, saved in batches
            self.quotas.ran(rec, result, self._wall())

    def _give_back(self, rec: TaskRecord, result: task_pb2.TaskResult | None) -> None:
        """What `rec` took from its gates goes back; the usage it reports is stored."""
        now = self._wall()
        for gate in self._gates:
            for key in gate.give_back(rec, result, now):
                self._wake(key)
        self._save_usage()

    def _save_usage(self) -> None:
        """Usage counted since the last save goes to the store: a row per key and period."""
        if usage := self.quotas.unsaved():
            self._spawn(self._store.add_usage(usage))

    # -- admission: quotas -----------------------------------------------------------------

    def _through_gates(self, rec: TaskRecord, slots: NodeSlots) -> bool:
        """Whether `rec` gets what its gates guard; if not, it is held (or failed, fail-fast)."""
        now = self._wall()
        taken: list[Admission] = []
        for gate in self._gates:
            refusal = gate.take(rec, now)
            if refusal is None:
                taken.append(gate)
                continue
            for g in taken:
                g.give_back(rec, None, now)
            self._scheduler.release(slots, rec)
            rec.state = _PENDING  # out of the queue: see _finish
            if refusal.fail:
                error = f"RESOURCE_EXHAUSTED: {refusal.reason}"
                self._finish(rec, _FAILED, task_pb2.TaskResult(error=error), by=COORDINATOR)
            else:
                self._hold(rec, refusal)
            return False
        for gate in taken:
            for key in gate.keys(rec):
                self._notice(key, "")
                if self._waiting.has(key):
                    self._wake(key)  # the next one in line may pass too
        return True

    def _hold(self, rec: TaskRecord, refusal: Refusal) -> None:
        rec.held_by, rec.wait_reason = refusal.key, refusal.reason
        self._waiting.hold(refusal.key, rec)
        if refusal.retry_after is not None:
            self._set_timer(
                TimerKind.ADMISSION, refusal.key, self._time.now() + refusal.retry_after
            )
        elif refusal.retry_at is not None:
            self._set_timer(TimerKind.ADMISSION, refusal.key, refusal.retry_at, calendar=True)
        self._notice(refusal.key, refusal.reason)
        self.events.emit(task_change(rec, by=COORDINATOR))

    def _wake(self, key: str) -> None:
        """The oldest task waiting on `key` goes back to the head of the queue."""
        self._leases.freed(key)  # a lease may wait for it too
        rec = self._waiting.next(key)
        if rec is None:
            return
        rec.held_by = rec.wait_reason = ""
        rec.state = _QUEUED
        self._scheduler.queue.push_front(rec)
        self.events.emit(task_change(rec, by=COORDINATOR))
        self._kick()

    def _notice(self, key: str, reason: str) -> None:
        """A quota event when a key starts holding tasks back (`reason`) or stops ("")."""
        if bool(reason) == (key in self._limited) or not key.startswith("quota:"):
            return
        if reason:
            self._limited.add(key)
        else:
            self._limited.discard(key)
        notice = task_pb2.QuotaNotice(
            key=key.removeprefix("quota:"), limited=bool(reason), reason=reason
        )
        event = task_pb2.Event(quota=notice, principal=COORDINATOR)
        event.time.FromNanoseconds(time.time_ns())
        self.events.emit(Change.of(event))

    # -- leases: locks held from outside the mesh --------------------------------------------

    async def acquire_lock(
        self, name: str, ttl: timedelta, wait: timedelta, *, shared: bool, by: Principal
    ) -> locks_pb2.Lease:
        """Take a lock for `ttl`, waiting up to `wait` for it; FailedPrecondition if held."""
        return await self._leases.acquire(name, ttl, wait, shared=shared, by=by)

    async def renew_lock(
        self, name: str, token: int, ttl: timedelta, *, by: Principal
    ) -> locks_pb2.Lease:
        return await self._leases.renew(name, token, ttl, by=by)

    async def release_lock(self, name: str, token: int, *, by: Principal) -> locks_pb2.Lease:
        return await self._leases.release(name, token, by=by)

    async def set_quota(self, quota: admin_pb2.Quota) -> admin_pb2.Quota:
        check_quota(quota, self.options.limits.max_string)
        await self._store.put_quota(quota.key, quota.SerializeToString())
        self.quotas.set(quota)
        self._wake(f"quota:{quota.key}")  # a raised limit lets waiting tasks through
        return quota

    async def delete_quota(self, key: str) -> admin_pb2.Quota:
        quota = self.quotas.delete(key)
        if quota is None:
            raise NotFound(f"no quota on key {key!r}")
        await self._store.delete_quota(key)
        self._wake(f"quota:{key}")
        return quota

    def _through_breakers(self, rec: TaskRecord, slots: NodeSlots) -> bool:
        """Whether `rec` may go to the node the scheduler chose; if not, it is put back.

        A half-open breaker lets the first task through as its probe and closes again.
        """
        keys = self._breaker_keys(rec, slots.node_id)
        if all(self._breakers.passes(k) for k in keys):
            for b in self._breakers.probing(keys, rec.id):
                self._breaker_changed(b)
            return True
        self._scheduler.release(slots, rec)
        backend = backend_key(rec.backend) if rec.backend else ""
        if backend and not self._breakers.passes(backend):
            rec.state = _PENDING  # held until the backend's breaker lets it through
            self._hold(rec, Refusal(backend, f"circuit breaker {backend} is open"))
        else:
            self._scheduler.queue.push_front(rec)
        return False

    def _breaker_changed(self, b: Breaker) -> None:
        """Apply a breaker's new state to dispatch, set its cooldown timer, and tell watchers."""
        if b.state == OPEN:
            self._set_timer(TimerKind.BREAKER, b.key, b.due)
            _log.warning("circuit breaker %s open: %s", b.key, b.last_error)
        elif b.state == CLOSED:
            _log.info("circuit breaker %s closed", b.key)
        kind, _, name = b.key.partition(":")
        if kind == "node":
            self._apply_node_state(name.partition("/")[0])
        elif kind == "backend" and b.passes:
            self._wake(b.key)  # half-open: one goes as the probe, the rest wait
            while b.state == CLOSED and self._waiting.has(b.key):
                self._wake(b.key)
        event = task_pb2.Event(breaker=b.proto(), principal=COORDINATOR)
        event.time.FromNanoseconds(time.time_ns())
        self.events.emit(Change.of(event))

    def _load_changed(self, session: NodeSession) -> None:
        """A node's resource guard throttled it, paused tasks or stopped: apply, tell watchers."""
        _log.log(
            logging.WARNING if session.throttled_by_load else logging.INFO,
            "node=%s throttled=%s min_priority=%d paused=%d reason=%s",
            session.node_id,
            session.throttled_by_load,
            session.min_priority,
            session.paused,
            session.throttle_reason or "-",
        )
        self._apply_node_state(session.node_id)
        event = task_pb2.Event(
            node=session.notice(), node_id=session.node_id, principal=session.principal.name
        )
        event.time.FromNanoseconds(time.time_ns())
        self.events.emit(Change.of(event))

    def _apply_node_state(self, node_id: str) -> None:
        """Whether a node takes work, which of its executors, and down to which priority: from
        drain, breakers and its resource guard."""
        session = self._sessions.get(node_id)
        if session is None:
            return
        key = node_key(node_id)
        if session.draining:
            self._scheduler.set_accepting(node_id, False, "draining")
        elif not self._breakers.passes(key):
            self._scheduler.set_accepting(node_id, False, "closed by its circuit breaker")
        else:
            self._scheduler.set_accepting(node_id, True)
        tripped = frozenset(
            b.key.rpartition("/")[2]
            for b in self._breakers.with_prefix(executor_key(node_id, ""))
            if not b.passes
        )
        self._scheduler.set_tripped(node_id, tripped)
        self._scheduler.set_min_priority(node_id, session.min_priority, session.busy_because)
        self._kick()

    def _record_attempt(self, rec: TaskRecord, state: int, result: task_pb2.TaskResult) -> None:
        attempt = task_pb2.Attempt(
            id=attempt_id(rec),
            node_id=rec.node_id,
            state=state,  # type: ignore[arg-type]
            result=result,
            started_at=timestamp(rec.started_at),
            finished_at=timestamp(self._wall()),
        )
        rec.attempts = (*rec.attempts, attempt)

    def _after_failure(
        self, rec: TaskRecord, state: int, result: task_pb2.TaskResult, *, by: str
    ) -> None:
        """An attempt ended: final, or (per its retry policy) tried again after a backoff."""
        delay = None
        if state != _SUCCEEDED:
            made = len(rec.attempts) + 1
            delay = retry_delay(rec.spec.retry, made, state, result, self._rng)
        if delay is None:
            self._finish(rec, state, result, by=by)
            return
        self._record_attempt(rec, state, result)
        rec.node_id = ""
        rec.started_at = None
        rec.release_at = self._wall() + delay  # shown in pending_reason
        rec.state = _PENDING
        self._set_timer(TimerKind.RELEASE, rec.id, self._time.now() + delay)
        self.events.emit(task_change(rec, by=by))

    # -- timers ----------------------------------------------------------------------------

    def _set_timer(
        self, kind: TimerKind, task_id: str, due: float, *, calendar: bool = False
    ) -> None:
        """Time `kind` for `task_id` at steady time `due`; `calendar`: at wall time `due`."""
        if calendar:
            due = self._time.from_wall(due)
        earliest = self._timers.next_due()
        self._timers.set(kind, task_id, due, calendar=calendar)
        if self._timer_wake is not None and (earliest is None or due < earliest):
            self._timer_wake.set()

    async def _run_timers(self) -> None:
        assert self._timer_wake is not None
        while True:
            due = self._timers.next_due()
            wait = 1.0 if due is None else min(1.0, max(0.0, due - self._time.now()))
            self._timer_wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._timer_wake.wait()
            self.tick()

    def tick(self) -> None:
        """Act on every timer that is due: release waiting tasks, time out unstarted ones,
        fire schedules, half-open breakers, end the restart grace."""
        if step := self._time.stepped():
            self._timers.shift(step)
        for kind, task_id in self._timers.pop_due(self._time.now()):
            if kind is TimerKind.SCHEDULE:
                self._schedules.fire(task_id)
                continue
            if kind is TimerKind.BREAKER:
                if (breaker := self._breakers.half_open(task_id)) is not None:
                    self._breaker_changed(breaker)
                continue
            if kind is TimerKind.RECOVERY:
                self._end_recovery()
                continue
            if kind is TimerKind.ADMISSION:
                self._wake(task_id)
                continue
            if kind is TimerKind.LEASE:
                self._leases.expire(task_id)
                continue
            if kind is TimerKind.UNPLACEABLE:
                self._fail_unplaceable(task_id, self._wall())
                continue
            rec = self._tasks.get(task_id)
            if rec is None or is_final(rec.state):
                continue
            if kind is TimerKind.RELEASE and rec.state == _PENDING and not rec.waiting_on:
                rec.release_at = None
                self._admit(rec)
                self.events.emit(task_change(rec, by=COORDINATOR))
            elif kind is TimerKind.QUEUE_TIMEOUT and rec.state in (_PENDING, _QUEUED):
                error = f"not started within its queue timeout of {rec.queue_timeout:g} s"
                self._finish(rec, _TIMED_OUT, task_pb2.TaskResult(error=error), by=COORDINATOR)

    def _fail_unplaceable(self, timer: str, now: float) -> None:
        """Fail the tasks of a class no connected node can run whose grace is over."""
        sweep = self._unplaceable.sweep(timer, now)
        if sweep.expired:
            error = f"FAILED_PRECONDITION: no connected node can run it: {sweep.reason}"
            for queued in sweep.expired:
                rec: TaskRecord = queued  # type: ignore[assignment]
                self._finish(rec, _FAILED, task_pb2.TaskResult(error=error), by=COORDINATOR)
            _log.info(
                "%d tasks failed: no connected node can run them: %s",
                len(sweep.expired),
                sweep.reason,
            )
        if sweep.again_at is not None:
            self._set_timer(TimerKind.UNPLACEABLE, timer, sweep.again_at, calendar=True)

    # -- schedules -------------------------------------------------------------------------

    async def create_schedule(
        self, schedule: admin_pb2.Schedule, *, by: Principal
    ) -> admin_pb2.Schedule:
        """Store a new schedule; its first run is its first firing time from now."""
        return await self._schedules.create(schedule, by=by)

    def schedules(self) -> list[admin_pb2.Schedule]:
        return self._schedules.all()

    async def delete_schedule(self, name: str) -> admin_pb2.Schedule:
        return await self._schedules.delete(name)

    async def pause_schedule(self, name: str, *, paused: bool) -> admin_pb2.Schedule:
        """Pause, or resume from now on (runs missed while paused are not made up)."""
        return await self._schedules.pause(name, paused=paused)

    def pace(self, sessions: int | None = None) -> Pace:
        """How often nodes heartbeat, and their lease: as configured, until the heartbeats of
        `sessions` nodes (those connected now) would pass max_heartbeat_rate a second. Then
        heartbeats are spaced out to keep to it, and leases lengthened in proportion: a node
        that crashes or disconnects is still seen at once (its stream ends); only one cut off
        silently is given up later. Heartbeats are most of what an idle node costs.
        """
        n = len(self._sessions) if sessions is None else sessions
        if n != self._pace[0]:
            base = self.options.heartbeat_interval.total_seconds()
            needed = n / self.options.max_heartbeat_rate  # s between a node's heartbeats
            interval = base if needed <= base else float(math.ceil(needed))
            self._pace = (n, Pace(interval, self.options.lease.total_seconds() * interval / base))
        return self._pace[1]

    async def _record_attempts(self) -> None:
        """Record what each node whose attempts changed now runs, for a restart to check its
        claims against. Off the hot path, once a sweep; what was dispatched since the last
        record is in the store meanwhile too (see _record_dispatched)."""
        moved, self._moved = self._moved, set()
        attempts = {
            node_id: "\n".join(
                f"{rec.id} {rec.attempt_epoch} {rec.attempt}"
                for rec in session.inflight.values()
                if not is_final(rec.state)
            )
            for node_id in moved
            if (session := self._sessions.get(node_id)) is not None
        }
        if attempts:
            await self._store.put_node_attempts(attempts)

    def _record_dispatched(self, attempts: Mapping[str, str]) -> None:
        """Record who was dispatched what just now, in the store's next group commit (no
        waiting for it): after a crash, a node reclaims an attempt only as recorded."""
        try:
            written = self._store.add_dispatched(attempts)
        except Exception:  # the store is closed: its tasks run again after the restart instead
            _log.exception("failed to record the attempts dispatched")
            return
        asyncio.ensure_future(written).add_done_callback(_log_failure)

    async def _sweep_leases(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.options.lease.total_seconds() / 4))
            try:
                await self._record_attempts()
            except Exception:  # recorded at the next sweep; reclaims are only an optimisation
                _log.exception("failed to record the attempts nodes run")
            now = self._clock()
            for session in list(self._sessions.values()):
                if session.last_seen < now - session.pace.lease:
                    _log.warning("node=%s lease expired", session.node_id)
                    self.detach(session)
                elif not self.tokens.valid(session.principal):
                    _log.warning("node=%s token expired; closing its session", session.node_id)
                    self.detach(session)

    async def revoke_token(self, name_or_id: str) -> TokenRow:
        """Revoke a token and end the node sessions opened with it."""
        row = await self.tokens.revoke(name_or_id)
        for session in list(self._sessions.values()):
            if session.principal.token_id == row.id:
                _log.warning("node=%s token revoked; closing its session", session.node_id)
                self.detach(session)
        return row

    def nodes(self) -> list[admin_pb2.NodeStatus]:
        """Joined nodes, then those discovered (`discovered`) but not joined."""
        now = self._clock()
        wall = self._wall()
        discovered = self.discovered()
        out = []
        for s in self._sessions.values():
            seen = discovered.get(s.node_id)
            out.append(
                s.status(
                    now=now,
                    wall=wall,
                    breakers=[b.proto() for b in self._node_breakers(s.node_id)],
                    health=seen.health if seen is not None else admin_pb2.NODE_HEALTH_UNSPECIFIED,
                )
            )
        out.extend(n for node_id, n in discovered.items() if node_id not in self._sessions)
        return out

    # -- figures for metrics ----------------------------------------------------------------

    @property
    def unfinished_count(self) -> Counter[str]:
        return self._unfinished

    @property
    def queued_count(self) -> int:
        return len(self._scheduler.queue)

    @property
    def breakers_open(self) -> int:
        return self._breakers.tripped

    def waiting_count(self) -> dict[str, int]:
        """Tasks a gate holds back, by key ("quota:<key>", "lock:<name>")."""
        return self._waiting.counts()

    def _node_breakers(self, node_id: str) -> list[Breaker]:
        node = self._breakers.get(node_key(node_id))
        return ([node] if node else []) + self._breakers.with_prefix(executor_key(node_id, ""))

    def session(self, node_id: str) -> NodeSession | None:
        """The node's session, if it has one."""
        return self._sessions.get(node_id)

    def _session_of(self, node_id: str) -> NodeSession:
        session = self._sessions.get(node_id)
        if session is None:
            raise NotFound(f"node {node_id!r} is not connected")
        return session

    def drain(self, node_id: str, grace: timedelta, *, leave: bool) -> admin_pb2.NodeStatus:
        """A node takes no new work, finishes what it runs within `grace`, gives back the rest."""
        session = self._session_of(node_id)
        session.draining = True
        session.drain(node_pb2.Drain(grace=to_duration(grace), leave=leave))
        self._apply_node_state(node_id)
        return self._node_status(node_id)

    def undrain(self, node_id: str) -> admin_pb2.NodeStatus:
        session = self._session_of(node_id)
        session.draining = False
        session.drain(node_pb2.Drain(undrain=True))
        self._apply_node_state(node_id)
        return self._node_status(node_id)

    def _node_status(self, node_id: str) -> admin_pb2.NodeStatus:
        return next(n for n in self.nodes() if n.info.node_id == node_id)

    def welcome(self, session: NodeSession) -> node_pb2.CoordinatorMessage:
        welcome = node_pb2.Welcome(session_id=session.id, epoch=self.epoch)
        session.pace.fill(welcome.heartbeat_interval, welcome.lease)
        return node_pb2.CoordinatorMessage(welcome=welcome)

    # -- encoding --------------------------------------------------------------------------

    def _pending_reason(self, rec: TaskRecord) -> str:
        if rec.state == _PENDING:
            if rec.held_by:
                return self._held_reason(rec)
            if rec.id in self._recovering:
                return (
                    "recovered after a restart: waiting for the nodes that were connected to"
                    " report whether they still run it"
                )
            if rec.waiting_on:
                ids = ", ".join(sorted(rec.waiting_on)[:5])
                return f"waiting on {len(rec.waiting_on)} upstream task(s): {ids}"
            if rec.release_at is not None:
                at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.release_at))
                if rec.attempts:
                    total = rec.spec.retry.max_attempts
                    return f"attempt {len(rec.attempts) + 1} of {total} at {at} (backoff)"
                return f"not before {at}"
        if rec.state != _QUEUED:
            return ""
        reason = self._scheduler.explain(rec)
        fails_at = self._unplaceable.fails_at(rec.placement.cls, rec.created_at)
        if fails_at is not None:
            at = time.strftime("%H:%M:%S", time.localtime(fails_at))
            reason += f"; fails at {at} unless a node that can run it connects"
        return reason

    def _held_reason(self, rec: TaskRecord) -> str:
        """Why a gate or a backend's breaker holds `rec`; a breaker's as it is now."""
        b = self._breakers.get(rec.held_by)
        if b is None or b.state == CLOSED:
            return rec.wait_reason
        at = time.strftime("%H:%M:%S", time.localtime(b.retry_at))
        probe = f"probe at {at}" if b.state == OPEN else "its probe is running"
        return f"{rec.wait_reason} ({probe}): {b.last_error}"

    def _task_proto(self, rec: TaskRecord) -> task_pb2.Task:
        if rec.durable or not is_final(rec.state):
            return live_task(rec, self._pending_reason(rec))
        # Final in memory, not yet in the store: shown as it was, since a crash now would run
        # it again (and a client told its outcome would have been told wrong).
        why = f": {self._store_error}" if self._store_error else ""
        task = live_task(rec, f"finished; its outcome is not recorded yet{why}")
        task.state = (
            _RUNNING if rec.started_at is not None else _ASSIGNED if rec.node_id else _PENDING
        )
        task.ClearField("result")
        task.ClearField("finished_at")
        return task
