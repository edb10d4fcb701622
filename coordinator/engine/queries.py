"""Queries on tasks: get, wait, cancel, list, watch, and pending reasons."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import timedelta

from shoal._output import output_size
from shoal.auth import Principal
from shoal.coordinator.encoding import attempt_id, live_task, stored_event, stored_task
from shoal.coordinator.engine.dispatch import Dispatcher
from shoal.coordinator.engine.lifecycle import TaskLifecycle
from shoal.coordinator.engine.states import ASSIGNED, CANCELLED, PENDING, QUEUED, RUNNING
from shoal.coordinator.events import Change
from shoal.coordinator.gates.breakers import CLOSED, OPEN
from shoal.coordinator.records import TaskRecord
from shoal.coordinator.store import LABEL_CHARS, StoredTask, TaskFilter
from shoal.coordinator.tokens import TokenRegistry
from shoal.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from shoal.specs import FINAL_STATES, is_final
from shoal.v1 import task_pb2

__all__ = ["SHUTTING_DOWN", "Queries", "hidden"]

_log = logging.getLogger("shoal.coordinator")
_REPLAY_PAGE = 1000
_PAGE_BYTES = 1 << 20  # of output in one page of a watch (one event at least)
MAX_DEPENDENTS = 1000  # downstream ids one Get returns
MAX_LABEL_FILTERS = 4
SHUTTING_DOWN = "the coordinator is shutting down: watch again from the last cursor received"


def hidden(by: Principal, tenant: str) -> bool:
    """Whether `tenant`'s tasks are out of `by`'s sight: to it they do not exist (NOT_FOUND, as
    for an unknown id, so ids of other tenants cannot be probed)."""
    return bool(by.tenant) and tenant != by.tenant


class Queries:
    """Reading tasks (get, wait, list, watch, and why one waits) and cancelling them."""

    def __init__(
        self, kernel: TaskLifecycle, dispatcher: Dispatcher, tokens: TokenRegistry
    ) -> None:
        self._k = kernel
        self._d = dispatcher
        self.tokens = tokens

    async def get(self, task_id: str, *, by: Principal, dependents: bool = False) -> task_pb2.Task:
        """One task; with `dependents`, also the tasks downstream of it (from the store)."""
        rec = self.live(task_id, by)
        task = self.task_proto(rec) if rec is not None else None
        if task is None:
            task = stored_task(await self.stored(task_id, by))
        if dependents:
            found = await self._k.store.dependents(task_id, MAX_DEPENDENTS)
            task.dependents.extend(tid for tid, tenant in found if not hidden(by, tenant))
        return task

    def live(self, task_id: str, by: Principal) -> TaskRecord | None:
        rec = self._k.tasks.get(task_id)
        if rec is not None and hidden(by, rec.tenant):
            raise NotFound(f"no task {task_id!r}")
        return rec

    async def stored(self, task_id: str, by: Principal) -> StoredTask:
        if not task_id:
            raise InvalidArgument("task_id is required")
        stored = await self._k.store.get(task_id)
        if stored is None or hidden(by, stored.row.tenant):
            raise NotFound(f"no task {task_id!r}")
        return stored

    async def wait(
        self, task_id: str, timeout: timedelta | None, *, by: Principal
    ) -> task_pb2.Task:
        """The task once its outcome is durable, or as it is when `timeout` passes."""
        rec = self.live(task_id, by)
        if rec is None:
            return stored_task(await self.stored(task_id, by))
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
        return self.task_proto(rec)

    async def cancel(self, task_id: str, *, by: Principal) -> task_pb2.Task:
        """Cancel a task: at once when queued; a running one is killed by its node."""
        rec = self.live(task_id, by)
        if rec is None:
            stored = await self.stored(task_id, by)
            if stored.outcome is None:
                raise FailedPrecondition(f"task {task_id!r} is not held by this coordinator")
            return stored_task(stored)
        if is_final(rec.state):
            return self.task_proto(rec)
        self.cancel_one(rec, by.name, "cancelled")
        for dependent in self._k.descendants(rec.id):
            self.cancel_one(dependent, by.name, f"cancelled with upstream task {rec.id}")
        if is_final(rec.state):
            return await self.wait(task_id, None, by=by)
        return self.task_proto(rec)

    def cancel_one(self, rec: TaskRecord, by: str, why: str) -> None:
        """Waiting tasks end at once; a running one is killed by its node, which reports it."""
        if is_final(rec.state):
            return
        rec.finished_by = by
        if rec.state in (PENDING, QUEUED):
            self._k.finish(rec, CANCELLED, task_pb2.TaskResult(error=f"{why} before it started"))
            return
        rec.cancel_requested = True
        session = self._d.sessions.get(rec.node_id)
        if session is not None:
            session.cancel(rec.id, attempt_id(rec))

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
        """Tasks newest first, filtered by state, tenant, executor, labels and creation time
        (in the store's query); paged by an opaque token."""
        only = _task_filter(executor, labels or {}, created_after, created_before)
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
        stored = await self._k.store.list_tasks(
            before_seq=before,
            tenant=tenant or None,
            final_states=finals,
            include_unfinished=include_live,
            limit=limit,
            only=only,
        )
        tasks: list[task_pb2.Task] = []
        for st in stored:
            rec = self._k.tasks.get(st.row.id)
            task = self.task_proto(rec) if rec is not None else stored_task(st)
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
        if len(task_ids) > self._k.options.max_watch_tasks:
            raise InvalidArgument(
                f"watch at most {self._k.options.max_watch_tasks} task ids at once"
            )
        ids = frozenset(task_ids)
        cursor = self._k.events.last_seq if since is None else since

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
            if self._k.events.closed:
                raise Unavailable(SHUTTING_DOWN)
            held = self._k.events.after(cursor, _REPLAY_PAGE)
            if held is None:
                upto = self._k.events.oldest_seq
                items = await self._k.store.events_between(cursor, upto, _REPLAY_PAGE)
                if not items:
                    cursor = upto - 1
                    continue
                cursor = items[-1][0]
                replayed = [Change.of(stored_event(seq, st)) for seq, st in items]
                batch = [c for c in replayed if keep(c)]
            else:
                if not held:
                    await self._k.events.wait_after(cursor)
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

    def pending_reason(self, rec: TaskRecord) -> str:
        if rec.state == PENDING:
            if rec.held_by:
                return self.held_reason(rec)
            if rec.id in self._k.recovering:
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
        if rec.state != QUEUED:
            return ""
        reason = self._k.scheduler.explain(rec)
        fails_at = self._k.unplaceable.fails_at(rec.placement.cls, rec.created_at)
        if fails_at is not None:
            at = time.strftime("%H:%M:%S", time.localtime(fails_at))
            reason += f"; fails at {at} unless a node that can run it connects"
        return reason

    def held_reason(self, rec: TaskRecord) -> str:
        """Why a gate or a backend's breaker holds `rec`; a breaker's as it is now."""
        b = self._k.breakers.get(rec.held_by)
        if b is None or b.state == CLOSED:
            return rec.wait_reason
        at = time.strftime("%H:%M:%S", time.localtime(b.retry_at))
        probe = f"probe at {at}" if b.state == OPEN else "its probe is running"
        return f"{rec.wait_reason} ({probe}): {b.last_error}"

    def task_proto(self, rec: TaskRecord) -> task_pb2.Task:
        if rec.durable or not is_final(rec.state):
            return live_task(rec, self.pending_reason(rec))
        # Final in memory, not yet in the store: shown as it was, since a crash now would run
        # it again (and a client told its outcome would have been told wrong).
        # Said only while the store fails: else it is recorded within a few milliseconds.
        why = self._k.store_error
        task = live_task(rec, f"finished; its outcome is not recorded yet: {why}" if why else "")
        task.state = RUNNING if rec.started_at is not None else ASSIGNED if rec.node_id else PENDING
        task.ClearField("result")
        task.ClearField("finished_at")
        return task


def _task_filter(
    executor: str,
    labels: Mapping[str, str],
    created_after: float | None,
    created_before: float | None,
) -> TaskFilter:
    """List's filters, checked: InvalidArgument naming each bad field."""
    bad: list[FieldViolation] = []
    if len(executor) > LABEL_CHARS or not executor.isprintable():
        bad.append(FieldViolation("executor", f"printable, at most {LABEL_CHARS} characters"))
    if len(labels) > MAX_LABEL_FILTERS:
        bad.append(FieldViolation("labels", f"at most {MAX_LABEL_FILTERS} entries"))
    else:
        for key, value in labels.items():
            if not key or len(key) > LABEL_CHARS or len(value) > LABEL_CHARS:
                bad.append(
                    FieldViolation(
                        f"labels[{key[:64]!r}]",
                        f"a key of 1 to {LABEL_CHARS} characters, a value of at most {LABEL_CHARS}",
                    )
                )
    if created_after is not None and created_before is not None and created_before <= created_after:
        bad.append(FieldViolation("created_before", "must be later than created_after"))
    if bad:
        raise InvalidArgument(
            "bad filter: " + "; ".join(f"{v.field}: {v.description}" for v in bad), bad
        )
    return TaskFilter(
        executor=executor,
        labels=tuple(sorted(labels.items())),
        created_after=created_after,
        created_before=created_before,
    )
