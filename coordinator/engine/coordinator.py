"""The coordinator's engine façade: accepts, stores, schedules and tracks tasks. No gRPC in here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

from google.protobuf import json_format

from shoal.auth import Principal
from shoal.config import CoreOptions
from shoal.coordinator.engine.clock import TimerLoop
from shoal.coordinator.engine.dispatch import Dispatcher
from shoal.coordinator.engine.intake import Intake, Submitted
from shoal.coordinator.engine.lifecycle import TaskLifecycle
from shoal.coordinator.engine.nodes import NodeSessions
from shoal.coordinator.engine.overview import overview
from shoal.coordinator.engine.queries import SHUTTING_DOWN, Queries
from shoal.coordinator.engine.recovery import recover
from shoal.coordinator.events import EventLog
from shoal.coordinator.gates.keys import quota_key
from shoal.coordinator.gates.locks import LockGate
from shoal.coordinator.gates.quotas import QuotaGate, check_quota
from shoal.coordinator.schedules import ScheduleBook
from shoal.coordinator.sessions import NodeSession, Pace
from shoal.coordinator.store import Store, TokenRow
from shoal.coordinator.tokens import NewToken, TokenRegistry
from shoal.errors import NotFound
from shoal.handshake import Direction
from shoal.v1 import admin_pb2, locks_pb2, node_pb2, task_pb2

__all__ = ["SHUTTING_DOWN", "Coordinator", "Submitted"]

_log = logging.getLogger("shoal.coordinator")


class Coordinator:
    """Owns every live task, the event log and the node sessions: the one object the servicers
    call. Its work is done by the engine's layers, each calling only those below it:
    TimerLoop (clock.py) > NodeSessions (nodes.py) > Intake (intake.py) > Queries (queries.py)
    > Dispatcher (dispatch.py) > TaskLifecycle (lifecycle.py)."""

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
        # Quotas from configuration, on top of the stored ones (a malformed one fails here).
        self._quotas = [json_format.ParseDict(q, admin_pb2.Quota()) for q in self.options.quotas]
        self.tokens = TokenRegistry(store, wall=wall)
        self.watchers_cut = 0  # watches ended because they fell behind the event log
        k = self._k = TaskLifecycle(
            store, self.options, clock=clock, wall=wall, rng=rng or random.Random()
        )
        self._d = Dispatcher(k)
        self._q = Queries(k, self._d, self.tokens)
        self._i = Intake(k)
        self._n = NodeSessions(k, self._d, self.tokens)
        self._schedules = ScheduleBook(
            store,
            tasks=k.tasks,
            submit=lambda specs, by: self._i.submit(specs, by=by),
            set_timer=k.set_timer,
            cancel_timer=k.timers.cancel,
            spawn=k.spawn,
            clock=k.time,
            limits=self.options,
            max_catch_up=self.options.max_catch_up,
        )
        self._t = TimerLoop(k, self._d, self._n, self._schedules)
        self._sweeper: asyncio.Task[None] | None = None
        self._timer_loop: asyncio.Task[None] | None = None

    # -- state the server, metrics and tests read ------------------------------------------

    @property
    def epoch(self) -> int:
        return self._k.epoch

    @property
    def events(self) -> EventLog:
        return self._k.events

    @property
    def accepting(self) -> bool:
        return self._k.accepting

    @accepting.setter
    def accepting(self, value: bool) -> None:
        self._k.accepting = value

    @property
    def quotas(self) -> QuotaGate:
        return self._k.quotas

    @property
    def locks(self) -> LockGate:
        return self._d.locks

    @property
    def finished_count(self) -> Counter[int]:
        return self._k.finished_count

    @property
    def discovered(self) -> Callable[[], Mapping[str, admin_pb2.NodeStatus]]:
        """Nodes known by other means than their session (mDNS): ListNodes shows them too."""
        return self._n.discovered

    @discovered.setter
    def discovered(self, nodes: Callable[[], Mapping[str, admin_pb2.NodeStatus]]) -> None:
        self._n.discovered = nodes

    # -- tasks: intake and queries ----------------------------------------------------------

    async def submit(
        self,
        specs: Sequence[task_pb2.TaskSpec],
        *,
        by: Principal,
        single: bool = False,
        request_id: str = "",
        client: str = "",
    ) -> list[Submitted]:
        """Store the tasks atomically, then queue them; returns once they are durable (see
        Intake.submit)."""
        return await self._i.submit(
            specs, by=by, single=single, request_id=request_id, client=client
        )

    async def get(self, task_id: str, *, by: Principal, dependents: bool = False) -> task_pb2.Task:
        """One task; with `dependents`, also the ids of the tasks downstream of it."""
        return await self._q.get(task_id, by=by, dependents=dependents)

    async def wait(
        self, task_id: str, timeout: timedelta | None, *, by: Principal
    ) -> task_pb2.Task:
        """The task once its outcome is durable, or as it is when `timeout` passes."""
        return await self._q.wait(task_id, timeout, by=by)

    async def cancel(self, task_id: str, *, by: Principal) -> task_pb2.Task:
        """Cancel a task: at once when queued; a running one is killed by its node."""
        return await self._q.cancel(task_id, by=by)

    async def list_tasks(
        self,
        *,
        states: Sequence[int],
        tenant: str,
        limit: int,
        page_token: str,
        by: Principal,
        executor: str = "",
        labels: Mapping[str, str] | None = None,
        created_after: float | None = None,
        created_before: float | None = None,
    ) -> tuple[list[task_pb2.Task], str]:
        """Tasks newest first, filtered in the store's query; paged by an opaque token."""
        return await self._q.list_tasks(
            states=states,
            tenant=tenant,
            limit=limit,
            page_token=page_token,
            by=by,
            executor=executor,
            labels=labels,
            created_after=created_after,
            created_before=created_before,
        )

    def watch(
        self,
        *,
        since: int | None,
        task_ids: Sequence[str] = (),
        output: bool = False,
        tenant: str = "",
        states: Sequence[int] = (),
        by: Principal,
    ) -> AsyncIterator[tuple[int, list[task_pb2.Event]]]:
        """(cursor, events) after `since`, from the store then live (see Queries.watch)."""
        return self._q.watch(
            since=since, task_ids=task_ids, output=output, tenant=tenant, states=states, by=by
        )

    # -- node sessions ----------------------------------------------------------------------

    def attach(
        self, hello: node_pb2.Hello, peer: str, *, by: Principal, adopted: bool = False
    ) -> NodeSession:
        """Start a node's session (see NodeSessions.attach)."""
        return self._n.attach(hello, peer, by=by, adopted=adopted)

    def detach(self, session: NodeSession) -> None:
        """End a node's session: its unfinished tasks are queued again with a new attempt."""
        self._n.detach(session)

    def on_message(self, session: NodeSession, msg: node_pb2.NodeMessage) -> None:
        """Apply one message from a node."""
        self._n.on_message(session, msg)

    def welcome(self, session: NodeSession) -> node_pb2.CoordinatorMessage:
        return self._n.welcome(session)

    def pace(self, sessions: int | None = None) -> Pace:
        """How often nodes heartbeat, and their lease (see NodeSessions.pace)."""
        return self._n.pace(sessions)

    def nodes(self) -> list[admin_pb2.NodeStatus]:
        """Joined nodes, then those discovered (`discovered`) but not joined."""
        return self._n.nodes()

    def session(self, node_id: str) -> NodeSession | None:
        """The node's session, if it has one."""
        return self._n.session(node_id)

    def drain(self, node_id: str, grace: timedelta, *, leave: bool) -> admin_pb2.NodeStatus:
        """A node takes no new work, finishes what it runs within `grace`, gives back the rest."""
        return self._n.drain(node_id, grace, leave=leave)

    def undrain(self, node_id: str) -> admin_pb2.NodeStatus:
        return self._n.undrain(node_id)

    # -- tokens and quotas, as the Admin and NodeGateway services see them -----------------

    async def create_token(self, **fields: Any) -> NewToken:
        """Make and store a token (the fields of TokenRegistry.create)."""
        return await self.tokens.create(**fields)

    def token_rows(self, *, include_revoked: bool) -> list[TokenRow]:
        return self.tokens.all() if include_revoked else self.tokens.active()

    async def revoke_token(self, name_or_id: str) -> TokenRow:
        """Revoke a token and end the node sessions opened with it."""
        return await self._n.revoke_token(name_or_id)

    def prove(
        self, direction: Direction, *, token_id: str, node_id: str, address: str, nonce: bytes
    ) -> bytes:
        """Answer a node's challenge: proof that this coordinator issued its token."""
        return self.tokens.prove(
            direction, token_id=token_id, node_id=node_id, address=address, nonce=nonce
        )

    def quota_list(self) -> list[admin_pb2.Quota]:
        return self._k.quotas.quotas()

    def usage(self, key: str = "") -> list[admin_pb2.KeyUsage]:
        """Usage counted per quota key and period (every key when `key` is empty)."""
        return self._k.quotas.usage(key)

    def tick(self) -> None:
        """Act on every timer that is due (see TimerLoop.tick)."""
        self._t.tick()

    # -- lifecycle, locks, quotas, schedules, figures ----------------------------------------

    async def start(self) -> None:
        """Open the store, start a new epoch and queue every unfinished task again."""
        self._k.epoch = await self._k.store.open()
        await self.tokens.load()
        self._k.events = EventLog(
            self._k.epoch, capacity=self.options.event_capacity, max_bytes=self.options.event_bytes
        )
        await recover(self._k, self._n, self.options)
        for body in await self._k.store.quotas():
            self._k.quotas.set(admin_pb2.Quota.FromString(body))
        for quota in self._quotas:
            check_quota(quota, self.options.max_string)
            self._k.quotas.set(quota)
        self._k.quotas.restore(await self._k.store.usage())
        await self._d.leases.load()
        await self._schedules.load()
        self._k.timer_wake = asyncio.Event()
        self._timer_loop = asyncio.create_task(self._t.run(), name="shoal-timers")
        self._sweeper = asyncio.create_task(self._n.sweep_leases(), name="shoal-lease-sweeper")
        self._k.accepting = True
        _log.info("coordinator started epoch=%d recovered=%d", self._k.epoch, len(self._k.tasks))

    async def stop(self) -> None:
        """Refuse new work, end watches, close node sessions, flush outcomes, close the store;
        idempotent."""
        self._k.accepting = False
        self._k.events.close()  # open watches end now, not when the server's grace runs out
        for loop_task in (self._sweeper, self._timer_loop):
            if loop_task is not None:
                loop_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loop_task
        self._sweeper = self._timer_loop = None
        self._d.moved.update(self._d.sessions)  # a node that is back soon reclaims these
        try:
            await self._n.record_attempts()
        except Exception:  # its tasks run again after the restart instead
            _log.exception("failed to record the attempts nodes run")
        for session in list(self._d.sessions.values()):
            session.close()
        if self._k.recorder is not None:  # one last try below; then they run again after a restart
            self._k.recorder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._k.recorder
        self._k.renumber(self._k.unrecorded)
        self._k.to_finish[:0], self._k.unrecorded = self._k.unrecorded, []
        self._k.flush_finished()
        while self._k.background:
            await asyncio.gather(*self._k.background, return_exceptions=True)
        await self._k.store.close()

    async def acquire_lock(
        self, name: str, ttl: timedelta, wait: timedelta, *, shared: bool, by: Principal
    ) -> locks_pb2.Lease:
        """Take a lock for `ttl`, waiting up to `wait` for it; FailedPrecondition if held."""
        return await self._d.leases.acquire(name, ttl, wait, shared=shared, by=by)

    async def renew_lock(
        self, name: str, token: int, ttl: timedelta, *, by: Principal
    ) -> locks_pb2.Lease:
        return await self._d.leases.renew(name, token, ttl, by=by)

    async def release_lock(self, name: str, token: int, *, by: Principal) -> locks_pb2.Lease:
        return await self._d.leases.release(name, token, by=by)

    async def set_quota(self, quota: admin_pb2.Quota) -> admin_pb2.Quota:
        check_quota(quota, self.options.max_string)
        await self._k.store.put_quota(quota.key, quota.SerializeToString())
        self._k.quotas.set(quota)
        self._d.wake(quota_key(quota.key))  # a raised limit lets waiting tasks through
        return quota

    async def delete_quota(self, key: str) -> admin_pb2.Quota:
        quota = self._k.quotas.get(key)
        if quota is None:
            raise NotFound(f"no quota on key {key!r}")
        await self._k.store.delete_quota(key)  # stored first: a failed delete changes nothing
        self._k.quotas.delete(key)
        self._d.wake(quota_key(key))
        return quota

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

    async def run_schedule(self, name: str) -> admin_pb2.Schedule:
        """Submit one run of the schedule now, as its timer would; its timing is unchanged."""
        return await self._schedules.run_now(name)

    @property
    def unfinished_count(self) -> Counter[str]:
        return self._k.unfinished

    @property
    def queued_count(self) -> int:
        return len(self._k.scheduler.queue)

    @property
    def breakers_open(self) -> int:
        return self._k.breakers.tripped

    def overview(self, *, by: Principal) -> admin_pb2.Overview:
        return overview(self._k, self.nodes(), self.waiting_count(), by=by)

    def waiting_count(self) -> dict[str, int]:
        """Tasks a gate holds back, by key ("quota:<key>", "lock:<name>")."""
        return self._d.waiting.counts()
