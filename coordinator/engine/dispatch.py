"""The dispatch pass and the gates, breakers and node state it goes through."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from shoal.auth import COORDINATOR
from shoal.coordinator.encoding import attempt_id, task_change
from shoal.coordinator.engine.lifecycle import TaskLifecycle
from shoal.coordinator.engine.states import ASSIGNED, FAILED, NO_RESULT, PENDING, QUEUED
from shoal.coordinator.events import Change
from shoal.coordinator.gates.base import Admission, Refusal, Waiting
from shoal.coordinator.gates.breakers import (
    CLOSED,
    OPEN,
    Breaker,
    backend_key,
    executor_key,
    node_key,
)
from shoal.coordinator.gates.keys import quota_of
from shoal.coordinator.gates.locks import LeaseTable, LockGate
from shoal.coordinator.placement import NodeSlots
from shoal.coordinator.records import TaskRecord
from shoal.coordinator.sessions import NodeSession
from shoal.coordinator.timers import TimerKind
from shoal.errors import InvalidArgument, ResourceExhausted
from shoal.templates import render
from shoal.v1 import node_pb2, task_pb2

__all__ = ["Dispatcher"]

_log = logging.getLogger("shoal.coordinator")


def _log_failure(done: asyncio.Future[None]) -> None:
    if not done.cancelled() and (err := done.exception()) is not None:
        _log.error("failed to record the attempts dispatched: %s", err)


class Dispatcher:
    """The dispatch pass: queued tasks go to nodes through their gates (quotas, locks) and
    breakers; what each node may take (drain, breakers, its load) is set here too."""

    def __init__(self, kernel: TaskLifecycle) -> None:
        self._k = kernel
        self.sessions: dict[str, NodeSession] = {}
        self.moved: set[str] = set()  # nodes whose attempts changed since last recorded
        self.dispatch_pending = False
        self.waiting = Waiting()  # tasks a gate holds back, by key
        self.limited: set[str] = set()  # keys holding tasks back now
        self.locks = LockGate()
        self.gates: list[Admission] = [kernel.quotas, self.locks]
        self.leases = LeaseTable(
            kernel.store,
            self.locks,
            set_timer=kernel.set_timer,
            cancel_timer=kernel.timers.cancel,
            spawn=kernel.spawn,
            wake=self.wake,
            clock=kernel.time,
            max_name=kernel.options.max_string,
            max_ttl=kernel.options.max_lock_ttl,
        )
        kernel.kick = self.kick

    def kick(self) -> None:
        if not self.dispatch_pending:
            self.dispatch_pending = True
            asyncio.get_running_loop().call_soon(self.dispatch)

    def dispatch(self) -> None:
        self.dispatch_pending = False
        by_node: dict[str, list[node_pb2.Assignment]] = {}
        lines: dict[str, list[str]] = {}  # "task epoch number" by node, for the store
        events: list[Change] = []
        gated = self._k.breakers.tripped > 0
        put_back = False
        gates = self._k.quotas.active
        for queued, slots in self._k.scheduler.schedule():
            rec: TaskRecord = queued  # type: ignore[assignment]
            rendered = None
            if rec.templated:
                rendered = self.rendered(rec, slots)
                if rendered is None:  # failed: its slot is free again
                    put_back = True
                    continue
            if (gates or rec.locks) and not self.through_gates(rec, slots):
                put_back = True  # its slot is free again: another task may take it
                continue
            if gated and not self.through_breakers(rec, slots):
                if gates or rec.locks:
                    self.give_back(rec, None)
                put_back = True
                continue
            session = self.sessions[slots.node_id]
            if session.behind:  # closed to work: it has not read what this pass sent it
                if gates or rec.locks:
                    self.give_back(rec, None)
                self._k.scheduler.release(slots, rec)
                self._k.scheduler.queue.push_front(rec)
                put_back = True
                continue
            rec.state = ASSIGNED
            rec.attempt += 1
            rec.attempt_epoch = self._k.epoch
            rec.node_id = session.node_id
            session.inflight[rec.id] = rec
            attempt = attempt_id(rec)
            assignment = node_pb2.Assignment(task_id=rec.id, attempt=attempt)
            if rendered is not None:
                assignment.spec.CopyFrom(rendered)
                size = rendered.ByteSize()
            else:  # straight from the stored bytes: no spec message kept for it
                assignment.spec.MergeFromString(rec.spec_bytes)
                size = len(rec.spec_bytes)
            session.assigned_bytes += size
            if session.sent(rec.id, size):  # it has not read what it was sent: no more
                self.apply_node_state(session.node_id)
            by_node.setdefault(session.node_id, []).append(assignment)
            lines.setdefault(session.node_id, []).append(f"{rec.id} {self._k.epoch} {rec.attempt}")
            events.append(task_change(rec, by=COORDINATOR))
        for node_id, assignments in by_node.items():
            self.sessions[node_id].assign(assignments)
        if by_node:
            self.moved.update(by_node)
            self.record_dispatched({node_id: "\n".join(x) for node_id, x in lines.items()})
        for event in events:
            self._k.events.emit(event)
        if self._k.scheduler.queue.unoffered:
            # Its grace runs from when tasks were submitted (wall times, as created_at).
            for timer, due in self._k.unplaceable.found(self._k.wall()):
                self._k.set_timer(TimerKind.UNPLACEABLE, timer, due, calendar=True)
        if put_back:
            self.kick()  # what was put back may go elsewhere; what was held left room

    def rendered(self, rec: TaskRecord, slots: NodeSlots) -> task_pb2.TaskSpec | None:
        """The spec of `rec` with its upstream values filled in; None when they are too large
        to send, and then `rec` has failed and its slot is free again."""
        results = rec.upstream_results or {}
        try:
            return render(
                rec.spec,
                [results.get(u, NO_RESULT) for u in rec.upstream],
                limit=self._k.options.max_rendered_spec_bytes,
            )
        except (ResourceExhausted, InvalidArgument) as err:
            # The task's own mistake (its references expand too far, or into a reference): it
            # fails, and its node never sees it.
            self._k.scheduler.release(slots, rec)
            rec.state = PENDING  # out of the queue: see TaskLifecycle.finish
            if isinstance(err, ResourceExhausted):
                error = f"RESOURCE_EXHAUSTED: {err.message} (max_rendered_spec_bytes)"
            else:
                error = f"INVALID_ARGUMENT: {err.message}"
            self._k.finish(rec, FAILED, task_pb2.TaskResult(error=error), by=COORDINATOR)
            return None

    def through_gates(self, rec: TaskRecord, slots: NodeSlots) -> bool:
        """Whether `rec` gets what its gates guard; if not, it is held (or failed, fail-fast)."""
        now = self._k.wall()
        taken: list[Admission] = []
        for gate in self.gates:
            refusal = gate.take(rec, now)
            if refusal is None:
                taken.append(gate)
                continue
            for g in taken:
                g.give_back(rec, None, now)
            self._k.scheduler.release(slots, rec)
            rec.state = PENDING  # out of the queue: see TaskLifecycle.finish
            if refusal.fail:
                error = f"RESOURCE_EXHAUSTED: {refusal.reason}"
                self._k.finish(rec, FAILED, task_pb2.TaskResult(error=error), by=COORDINATOR)
            else:
                self.hold(rec, refusal)
            return False
        for gate in taken:
            for key in gate.keys(rec):
                self.notice(key, "")
                if self.waiting.has(key):
                    self.wake(key)  # the next one in line may pass too
        return True

    def hold(self, rec: TaskRecord, refusal: Refusal) -> None:
        rec.held_by, rec.wait_reason = refusal.key, refusal.reason
        self.waiting.hold(refusal.key, rec)
        if refusal.retry_after is not None:
            self._k.set_timer(
                TimerKind.ADMISSION, refusal.key, self._k.time.now() + refusal.retry_after
            )
        elif refusal.retry_at is not None:
            self._k.set_timer(TimerKind.ADMISSION, refusal.key, refusal.retry_at, calendar=True)
        self.notice(refusal.key, refusal.reason)
        self._k.events.emit(task_change(rec, by=COORDINATOR))

    def wake(self, key: str) -> None:
        """The oldest task waiting on `key` goes back to the head of the queue."""
        self.leases.freed(key)  # a lease may wait for it too
        rec = self.waiting.next(key)
        if rec is None:
            return
        rec.held_by = rec.wait_reason = ""
        rec.state = QUEUED
        self._k.scheduler.queue.push_front(rec)
        self._k.events.emit(task_change(rec, by=COORDINATOR))
        self.kick()

    def notice(self, key: str, reason: str) -> None:
        """A quota event when a key starts holding tasks back (`reason`) or stops ("")."""
        quota = quota_of(key)
        if bool(reason) == (key in self.limited) or quota is None:
            return
        if reason:
            self.limited.add(key)
        else:
            self.limited.discard(key)
        notice = task_pb2.QuotaNotice(key=quota, limited=bool(reason), reason=reason)
        event = task_pb2.Event(quota=notice, principal=COORDINATOR)
        event.time.FromNanoseconds(time.time_ns())
        self._k.events.emit(Change.of(event))

    def through_breakers(self, rec: TaskRecord, slots: NodeSlots) -> bool:
        """Whether `rec` may go to the node the scheduler chose; if not, it is put back.

        A half-open breaker lets the first task through as its probe and closes again.
        """
        keys = self.breaker_keys(rec, slots.node_id)
        if all(self._k.breakers.passes(k) for k in keys):
            for b in self._k.breakers.probing(keys, rec.id):
                self.breaker_changed(b)
            return True
        self._k.scheduler.release(slots, rec)
        backend = backend_key(rec.backend) if rec.backend else ""
        if backend and not self._k.breakers.passes(backend):
            rec.state = PENDING  # held until the backend's breaker lets it through
            self.hold(rec, Refusal(backend, f"circuit breaker {backend} is open"))
        else:
            self._k.scheduler.queue.push_front(rec)
        return False

    def breaker_keys(self, rec: TaskRecord, node_id: str) -> tuple[str, ...]:
        keys = (node_key(node_id), executor_key(node_id, rec.placement.cls.executor))
        return (*keys, backend_key(rec.backend)) if rec.backend else keys

    def end_attempt(
        self, rec: TaskRecord, node_id: str, result: task_pb2.TaskResult | None
    ) -> None:
        """An attempt ended (`result` None: without one, e.g. given back or lost): its verdict
        on its breakers, and what it took at dispatch given back."""
        # The common case costs two checks: no breaker has failures, no gate took anything.
        infra = result is not None and result.infrastructure_failure
        if self._k.breakers or infra:
            keys = self.breaker_keys(rec, node_id)
            if result is None:
                changed = self._k.breakers.abandoned(keys, rec.id)
            elif infra:
                changed = self._k.breakers.failed(keys, rec.id, result.error)
            else:
                changed = self._k.breakers.succeeded(keys, rec.id)
            for b in changed:
                self.breaker_changed(b)
        if self._k.quotas.active or rec.locks or (result is not None and result.HasField("usage")):
            self.give_back(rec, result)
        elif result is not None:  # usage by key counts every run: a tally, saved in batches
            self._k.quotas.ran(rec, result, self._k.wall())

    def give_back(self, rec: TaskRecord, result: task_pb2.TaskResult | None) -> None:
        """What `rec` took from its gates goes back; the usage it reports is stored."""
        now = self._k.wall()
        for gate in self.gates:
            for key in gate.give_back(rec, result, now):
                self.wake(key)
        self._k.save_usage()

    def breaker_changed(self, b: Breaker) -> None:
        """Apply a breaker's new state to dispatch, set its cooldown timer, and tell watchers."""
        if b.state == OPEN:
            self._k.set_timer(TimerKind.BREAKER, b.key, b.due)
            _log.warning("circuit breaker %s open: %s", b.key, b.last_error)
        elif b.state == CLOSED:
            _log.info("circuit breaker %s closed", b.key)
        kind, _, name = b.key.partition(":")
        if kind == "node":
            self.apply_node_state(name.partition("/")[0])
        elif kind == "backend" and b.passes:
            self.wake(b.key)  # half-open: one goes as the probe, the rest wait
            while b.state == CLOSED and self.waiting.has(b.key):
                self.wake(b.key)
        event = task_pb2.Event(breaker=b.proto(), principal=COORDINATOR)
        event.time.FromNanoseconds(time.time_ns())
        self._k.events.emit(Change.of(event))

    def load_changed(self, session: NodeSession) -> None:
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
        self.apply_node_state(session.node_id)
        event = task_pb2.Event(
            node=session.notice(), node_id=session.node_id, principal=session.principal.name
        )
        event.time.FromNanoseconds(time.time_ns())
        self._k.events.emit(Change.of(event))

    def apply_node_state(self, node_id: str) -> None:
        """Whether a node takes work, which of its executors, and down to which priority: from
        drain, breakers and its resource guard."""
        session = self.sessions.get(node_id)
        if session is None:
            return
        key = node_key(node_id)
        if session.draining:
            self._k.scheduler.set_accepting(node_id, False, "draining")
        elif not self._k.breakers.passes(key):
            self._k.scheduler.set_accepting(node_id, False, "closed by its circuit breaker")
        elif session.behind:
            self._k.scheduler.set_accepting(
                node_id, False, "it has not read the tasks sent to it yet"
            )
        else:
            self._k.scheduler.set_accepting(node_id, True)
        tripped = frozenset(
            b.key.rpartition("/")[2]
            for b in self._k.breakers.with_prefix(executor_key(node_id, ""))
            if not b.passes
        )
        self._k.scheduler.set_tripped(node_id, tripped)
        self._k.scheduler.set_min_priority(node_id, session.min_priority, session.busy_because)
        self.kick()

    def record_dispatched(self, attempts: Mapping[str, str]) -> None:
        """Record who was dispatched what just now, in the store's next group commit (no
        waiting for it): after a crash, a node reclaims an attempt only as recorded."""
        try:
            written = self._k.store.add_dispatched(attempts)
        except Exception:  # the store is closed: its tasks run again after the restart instead
            _log.exception("failed to record the attempts dispatched")
            return
        asyncio.ensure_future(written).add_done_callback(_log_failure)

    def node_breakers(self, node_id: str) -> list[Breaker]:
        node = self._k.breakers.get(node_key(node_id))
        return ([node] if node else []) + self._k.breakers.with_prefix(executor_key(node_id, ""))
