"""Intake: tasks submitted, stored durably, then queued."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

from shoal.auth import Principal
from shoal.coordinator.encoding import task_change, task_record, task_row
from shoal.coordinator.engine.lifecycle import TaskLifecycle
from shoal.coordinator.engine.queries import hidden
from shoal.coordinator.engine.states import PENDING
from shoal.coordinator.gates.backpressure import Backpressure
from shoal.coordinator.placement import fields_of
from shoal.coordinator.records import TaskRecord
from shoal.coordinator.store import Request, TaskRow
from shoal.errors import FieldViolation, InvalidArgument, Unavailable
from shoal.specs import is_final
from shoal.v1 import task_pb2
from shoal.validation import check_request_id, validate_batch

__all__ = ["Intake", "Submitted"]

_log = logging.getLogger("shoal.coordinator")


@dataclass(frozen=True, slots=True)
class Submitted:
    task_id: str
    created: bool
    seq: int


class Intake:
    """Accepting tasks: tenant, validation, backpressure, ids, the durable insert, linking."""

    def __init__(self, kernel: TaskLifecycle) -> None:
        self._k = kernel
        self.backpressure = Backpressure(
            kernel.options,
            kernel.unfinished,
            clock=kernel.clock,
            finished=lambda: kernel.finished_count.total(),
            rng=kernel.rng,
        )

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
        if not self._k.accepting:
            raise Unavailable("the coordinator is not accepting tasks")
        if by.tenant:
            for spec in specs:
                by.check_tenant(spec.tenant or by.tenant, f"tenant {spec.tenant!r}")
                spec.tenant = by.tenant
        # Each spec is serialized (for its row) and its fields listed once, for all that follows.
        encoded = [spec.SerializeToString() for spec in specs]
        fields = [fields_of(spec) for spec in specs]
        validate_batch(specs, self._k.options, single=single, encoded=encoded, fields=fields)
        check_request_id(request_id, self._k.options)
        # Counted as unfinished from here, before any await: concurrent submits see each other.
        reserved = self.backpressure.reserve(specs, waiter=f"{by.name}\0{client}" if client else "")
        records: list[TaskRecord] = []
        rows: list[TaskRow] = []
        try:
            await self.check_upstream_ids(specs, by)
            now = self._k.wall()
            steady = self._k.time.now()
            # A task id is its acceptance number's low 32 bits, then 32 random ones: unique,
            # and in order, so the store's index of ids grows at its end (random ids cost 3x).
            noise = os.urandom(4 * len(specs)).hex()  # one call for the batch
            for i, spec in enumerate(specs):
                seq = self._k.events.reserve()
                task_id = f"{seq & 0xFFFFFFFF:08x}{noise[8 * i : 8 * i + 8]}"
                rec = task_record(task_id, seq, spec, encoded[i], now, by.name, fields[i])
                if rec.more is not None and rec.queue_timeout is not None:
                    rec.queue_deadline = steady + rec.queue_timeout
                records.append(rec)
                rows.append(task_row(rec, spec))
            # Steady time: a wall-clock step neither ends nor stretches the dedupe window.
            request = Request(f"{by.name}\0{request_id}", steady) if request_id else None
            existing, upstream = await self._k.store.insert(rows, request)
            created = [r for r, old in zip(records, existing, strict=True) if old is None]
            for rec, ups in zip(records, upstream, strict=True):
                if ups:  # else the shared empty one: most tasks have no upstream
                    rec.upstream = ups
            outcomes = await self._k.outcomes_of(created, exclude={r.id for r in created})
        except BaseException:
            self.backpressure.release(reserved)
            self._k.events.abandon(r.seq for r in records)
            raise
        # From here on nothing awaits: upstream tasks cannot finish between linking and queueing.
        out: list[Submitted] = []
        for rec, old in zip(records, existing, strict=True):
            if old is not None:
                self._k.events.abandon((rec.seq,))
                self._k.unfinished[rec.tenant] -= 1  # reserved, but an existing task's key
                out.append(Submitted(old, False, 0))
            else:
                self._k.tasks[rec.id] = rec
                out.append(Submitted(rec.id, True, rec.seq))
        accepted = []
        now_ns = time.time_ns()  # one for the batch, held by each of its events
        for rec in created:
            self._k.link(rec, outcomes)
            self._k.admit(rec)
            change = task_change(rec, by=rec.submitted_by, seq=rec.seq, time_ns=now_ns)
            if is_final(change.state):  # skipped at once: its outcome is its own, later event
                change.state = PENDING
                change.result = None
            accepted.append(change)
        self._k.events.publish(accepted)
        if accepted:
            # A turn of the loop before answering: the dispatcher, kicked by `admit`, sends the
            # tasks on their way first (in one pass for all the submits answered this turn).
            await asyncio.sleep(0)
        return out

    async def check_upstream_ids(self, specs: Sequence[task_pb2.TaskSpec], by: Principal) -> None:
        """Every upstream named by id exists and is visible to the submitter (another
        tenant's task is answered as one that does not exist)."""
        for i, spec in enumerate(specs):
            for j, dep in enumerate(spec.depends_on):
                if not dep.HasField("task_id"):
                    continue
                tenant = None
                if (live := self._k.tasks.get(dep.task_id)) is not None:
                    tenant = live.tenant
                elif (stored := await self._k.store.get(dep.task_id)) is not None:
                    tenant = stored.row.tenant
                if tenant is None or hidden(by, tenant):
                    raise InvalidArgument(
                        f"specs[{i}].depends_on[{j}]: no task {dep.task_id!r}",
                        [FieldViolation(f"specs[{i}].depends_on[{j}]", "no such task")],
                    )
