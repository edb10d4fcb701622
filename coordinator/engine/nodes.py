"""Node sessions as the engine sees them: attach, detach, reclaims, pace (their updates:
updates.py)."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import timedelta

from shoal.auth import COORDINATOR, Principal
from shoal.coordinator.encoding import attempt_id, task_change
from shoal.coordinator.engine.dispatch import Dispatcher
from shoal.coordinator.engine.lifecycle import TaskLifecycle
from shoal.coordinator.engine.states import (
    ASSIGNED,
    CANCELLED,
    FAILED,
    PENDING,
    RUNNING,
)
from shoal.coordinator.engine.updates import apply_updates
from shoal.coordinator.gates.breakers import node_key
from shoal.coordinator.gates.ratelimit import TokenBucket
from shoal.coordinator.records import TaskRecord
from shoal.coordinator.sessions import NodeSession, Pace
from shoal.coordinator.store import TokenRow
from shoal.coordinator.timers import TimerKind
from shoal.coordinator.tokens import TokenRegistry
from shoal.coordinator.validation import check_hello, drop_unserved
from shoal.errors import InvalidArgument, NotFound, Unavailable
from shoal.specs import is_final, printable, to_duration
from shoal.v1 import admin_pb2, node_pb2, task_pb2

__all__ = ["NodeSessions"]

_log = logging.getLogger("shoal.coordinator")


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


class NodeSessions:
    """Node sessions: attach and detach, what nodes report, reclaims after a restart, pace,
    lease sweeps, drain."""

    def __init__(
        self, kernel: TaskLifecycle, dispatcher: Dispatcher, tokens: TokenRegistry
    ) -> None:
        self._k = kernel
        self._d = dispatcher
        self.tokens = tokens
        self.paced = (-1, Pace(0.0, 0.0))  # for how many sessions, what pace
        # Nodes known by other means than their session (mDNS), by node id, with their health:
        # ListNodes shows them too. The server sets it when it watches the LAN.
        self.discovered: Callable[[], Mapping[str, admin_pb2.NodeStatus]] = dict
        # After a restart: the nodes that held a session when the coordinator last ran, and
        # who ran what then, as recorded: (node id, epoch, number) by task. Only that node may
        # reclaim that attempt.
        self.awaited: set[str] = set()
        self.dispatched: dict[str, tuple[str, int, int]] = {}

    def expect_back(self, members: Iterable[str], recorded: Mapping[str, str]) -> None:
        """After a restart: await the nodes that held a session (`members`); each may reclaim
        only the attempts recorded as its own (`recorded`: "task epoch number" lines by node)."""
        self.awaited = set(members)
        self.dispatched = _dispatched(recorded)

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
        check_hello(hello, by, self._k.options)
        if not self._k.accepting:
            raise Unavailable("the coordinator is shutting down")
        if dropped := drop_unserved(info):
            _log.warning(
                "node=%s offers no executor serving its %s: ignored",
                info.node_id,
                ",".join(dropped),
            )
        old = self._d.sessions.get(info.node_id)
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
                self._k.options.node_message_rate,
                self._k.options.node_message_burst,
                clock=self._k.clock,
            ),
            now=self._k.clock(),
            wall=self._k.wall(),
            pace=self.pace(len(self._d.sessions) + 1),
            adopted=adopted,
        )
        self._d.sessions[info.node_id] = session
        for running in hello.running:
            rec = self._k.tasks.get(running.task_id)
            if rec is not None and self.reclaims(rec, session, running.attempt):
                self._d.moved.add(info.node_id)
                self._k.recovering.discard(rec.id)
                rec.attempt_epoch, rec.attempt = running.attempt.epoch, running.attempt.number
                rec.node_id = info.node_id
                if rec.state != RUNNING:
                    rec.state = RUNNING
                    rec.started_at = self._k.wall()
                    self._k.events.emit(task_change(rec, by=by.name))
                session.inflight[rec.id] = rec
                session.slots.take(rec.placement.cls.resources)
            elif rec is None or not (is_final(rec.state) and attempt_id(rec) == running.attempt):
                # (A result the node sends again, as it was recorded, needs no answer.)
                session.cancel(running.task_id, running.attempt)
        self._k.scheduler.add_node(session.slots)
        self._d.apply_node_state(info.node_id)
        if info.node_id not in self.awaited:
            self._k.spawn(self._k.store.set_member(info.node_id, True))
        else:
            self.awaited.discard(info.node_id)
            if not self.awaited:
                self.end_recovery()  # every node that was there is back
        _log.info(
            "node=%s joined peer=%s%s slots=%d executors=%s",
            info.node_id,
            peer,
            " (adopted)" if adopted else "",
            session.slots.slots,
            ",".join(info.executors),
        )
        self._k.kick()
        return session

    def reclaims(self, rec: TaskRecord, session: NodeSession, attempt: task_pb2.AttemptId) -> bool:
        """Whether a node that reconnects still owns the attempt of `rec` it reports running:
        the attempt it was dispatched (in this epoch, or as recorded before a restart), of a
        task its Hello, and so its token, lets it run. Any other claim is refused."""
        if is_final(rec.state) or rec.cancel_requested:
            return False
        node_id = session.node_id
        if rec.node_id == node_id:  # assigned to it in this epoch and not lost since
            owned = (attempt.epoch, attempt.number) == (rec.attempt_epoch, rec.attempt) and (
                rec.state in (ASSIGNED, RUNNING)
            )
        elif rec.id in self._k.recovering:
            owned = self.dispatched.get(rec.id) == (node_id, attempt.epoch, attempt.number)
        else:
            owned = False
        if owned and not rec.placement.cls.fits(session.slots):
            _log.warning(
                "node=%s task=%s reclaim refused: the node may not run it", node_id, rec.id
            )
            return False
        return owned

    def end_recovery(self) -> None:
        """The restart grace is over: recovered tasks no node reclaimed are queued."""
        self._k.timers.cancel(TimerKind.RECOVERY, "")
        recovering, self._k.recovering = self._k.recovering, set()
        self.awaited.clear()
        self.dispatched = {}
        for task_id in recovering:
            rec = self._k.tasks.get(task_id)
            if rec is not None and rec.state == PENDING:
                self._k.admit(rec)
        if recovering:
            _log.info("restart grace over: %d recovered tasks queued", len(recovering))

    def detach(self, session: NodeSession) -> None:
        """End a node's session: its unfinished tasks are queued again with a new attempt."""
        if self._d.sessions.get(session.node_id) is not session:
            return
        del self._d.sessions[session.node_id]
        self._k.scheduler.remove_node(session.node_id)
        session.close()
        if self._k.accepting:  # not when the coordinator stops: it expects them back
            self._k.spawn(self._k.store.set_member(session.node_id, False))
        lost = [rec for rec in session.inflight.values() if not is_final(rec.state)]
        session.inflight.clear()
        if self._k.accepting:  # it may be back soon: no task fails for want of it meanwhile
            grace = (self._k.options.restart_grace or self._k.options.lease).total_seconds()
            self._k.unplaceable.hold(self._k.wall() + grace)
        if lost:
            # A node lost with work in flight is one infrastructure failure of the node.
            key = node_key(session.node_id)
            breaker = self._k.breakers.get(key)
            probe = breaker.probe if breaker is not None else ""
            for b in self._k.breakers.failed([key], probe, f"node {session.node_id} was lost"):
                self._d.breaker_changed(b)
        requeued = 0
        for rec in lost:
            self._d.end_attempt(rec, session.node_id, None)
            if rec.cancel_requested:
                self._k.finish(rec, CANCELLED, task_pb2.TaskResult(error="cancelled; node left"))
                continue
            lost_result = task_pb2.TaskResult(
                error=f"node {session.node_id} was lost", infrastructure_failure=True
            )
            if rec.spec.retry.max_attempts:
                self._k.after_failure(rec, FAILED, lost_result, by=COORDINATOR)
                continue
            # Without a retry policy a lost node never loses a task: it runs again at once.
            self._k.record_attempt(rec, FAILED, lost_result)
            self._k.requeue(rec)
            requeued += 1
        _log.info("node=%s left requeued=%d", session.node_id, requeued)
        self._k.kick()

    def on_message(self, session: NodeSession, msg: node_pb2.NodeMessage) -> None:
        """Apply one message from a node."""
        session.last_seen = self._k.clock()
        kind = msg.WhichOneof("msg")
        if kind == "updates":
            self.on_updates(session, msg.updates.updates)
        elif kind == "heartbeat":
            # A node's view of its lease must stay well ahead: answered at least 4 times a lease.
            session.renew(msg.heartbeat.seq, session.last_seen, self.pace())
            if msg.heartbeat.draining != session.draining:
                session.draining = msg.heartbeat.draining
                self._d.apply_node_state(session.node_id)
            if session.note_load(msg.heartbeat):
                self._d.load_changed(session)
            loaded = msg.heartbeat.loaded_models
            if loaded != session.loaded_models and "ollama" in session.slots.executors:
                most = self._k.options.max_string
                session.loaded_models = [
                    m for m in loaded[: self._k.options.max_labels] if printable(m, most) == m
                ]
                session.slots.loaded_models = frozenset(session.loaded_models)
        elif kind == "hello":
            raise InvalidArgument("hello is only valid as the first message of a session")

    def on_updates(self, session: NodeSession, updates: Sequence[node_pb2.TaskUpdate]) -> None:
        apply_updates(self._k, self._d, session, updates)

    def pace(self, sessions: int | None = None) -> Pace:
        """How often nodes heartbeat, and their lease: as configured, until the heartbeats of
        `sessions` nodes (those connected now) would pass max_heartbeat_rate a second. Then
        heartbeats are spaced out to keep to it, and leases lengthened in proportion: a node
        that crashes or disconnects is still seen at once (its stream ends); only one cut off
        silently is given up later. Heartbeats are most of what an idle node costs.
        """
        n = len(self._d.sessions) if sessions is None else sessions
        if n != self.paced[0]:
            base = self._k.options.heartbeat_interval.total_seconds()
            needed = n / self._k.options.max_heartbeat_rate  # s between a node's heartbeats
            interval = base if needed <= base else float(math.ceil(needed))
            self.paced = (
                n,
                Pace(interval, self._k.options.lease.total_seconds() * interval / base),
            )
        return self.paced[1]

    async def record_attempts(self) -> None:
        """Record what each node whose attempts changed now runs, for a restart to check its
        claims against. Off the hot path, once a sweep; what was dispatched since the last
        record is in the store meanwhile too (see Dispatcher.record_dispatched)."""
        moved, self._d.moved = self._d.moved, set()
        attempts = {
            node_id: "\n".join(
                f"{rec.id} {rec.attempt_epoch} {rec.attempt}"
                for rec in session.inflight.values()
                if not is_final(rec.state)
            )
            for node_id in moved
            if (session := self._d.sessions.get(node_id)) is not None
        }
        if attempts:
            await self._k.store.put_node_attempts(attempts)

    async def sweep_leases(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self._k.options.lease.total_seconds() / 4))
            try:
                await self.record_attempts()
            except Exception:  # recorded at the next sweep; reclaims are only an optimisation
                _log.exception("failed to record the attempts nodes run")
            now = self._k.clock()
            for session in list(self._d.sessions.values()):
                if session.last_seen < now - session.pace.lease:
                    _log.warning("node=%s lease expired", session.node_id)
                    self.detach(session)
                elif not self.tokens.valid(session.principal):
                    _log.warning("node=%s token expired; closing its session", session.node_id)
                    self.detach(session)

    async def revoke_token(self, name_or_id: str) -> TokenRow:
        """Revoke a token and end the node sessions opened with it."""
        row = await self.tokens.revoke(name_or_id)
        for session in list(self._d.sessions.values()):
            if session.principal.token_id == row.id:
                _log.warning("node=%s token revoked; closing its session", session.node_id)
                self.detach(session)
        return row

    def nodes(self) -> list[admin_pb2.NodeStatus]:
        """Joined nodes, then those discovered (`discovered`) but not joined."""
        now = self._k.clock()
        wall = self._k.wall()
        discovered = self.discovered()
        out = []
        for s in self._d.sessions.values():
            seen = discovered.get(s.node_id)
            out.append(
                s.status(
                    now=now,
                    wall=wall,
                    breakers=[b.proto() for b in self._d.node_breakers(s.node_id)],
                    health=seen.health if seen is not None else admin_pb2.NODE_HEALTH_UNSPECIFIED,
                )
            )
        out.extend(n for node_id, n in discovered.items() if node_id not in self._d.sessions)
        return out

    def session(self, node_id: str) -> NodeSession | None:
        """The node's session, if it has one."""
        return self._d.sessions.get(node_id)

    def session_of(self, node_id: str) -> NodeSession:
        session = self._d.sessions.get(node_id)
        if session is None:
            raise NotFound(f"node {node_id!r} is not connected")
        return session

    def drain(self, node_id: str, grace: timedelta, *, leave: bool) -> admin_pb2.NodeStatus:
        """A node takes no new work, finishes what it runs within `grace`, gives back the rest."""
        session = self.session_of(node_id)
        session.draining = True
        session.drain(node_pb2.Drain(grace=to_duration(grace), leave=leave))
        self._d.apply_node_state(node_id)
        return self.node_status(node_id)

    def undrain(self, node_id: str) -> admin_pb2.NodeStatus:
        session = self.session_of(node_id)
        session.draining = False
        session.drain(node_pb2.Drain(undrain=True))
        self._d.apply_node_state(node_id)
        return self.node_status(node_id)

    def node_status(self, node_id: str) -> admin_pb2.NodeStatus:
        return next(n for n in self.nodes() if n.info.node_id == node_id)

    def welcome(self, session: NodeSession) -> node_pb2.CoordinatorMessage:
        welcome = node_pb2.Welcome(session_id=session.id, epoch=self._k.epoch)
        session.pace.fill(welcome.heartbeat_interval, welcome.lease)
        return node_pb2.CoordinatorMessage(welcome=welcome)
