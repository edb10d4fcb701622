"""Conversions of the core: specs into task records; records into store rows, and records and
stored rows into messages (tasks, attempts, events)."""

from __future__ import annotations

import time
from typing import Any

from shoal.coordinator.events import Change
from shoal.coordinator.gates.locks import parse_locks
from shoal.coordinator.placement import fields_of, plain_key, requirements_of
from shoal.coordinator.records import TaskRecord
from shoal.coordinator.store import LABEL_CHARS, FinishedRow, StoredTask, TaskRow
from shoal.specs import executor_of, is_final, timestamp
from shoal.templates import has_references
from shoal.v1 import task_pb2

__all__ = [
    "attempt_id",
    "finished_row",
    "live_task",
    "stored_event",
    "stored_task",
    "task_change",
    "task_record",
    "task_row",
]

_QUEUED = task_pb2.TASK_STATE_QUEUED


def task_record(
    task_id: str,
    seq: int,
    spec: task_pb2.TaskSpec,
    spec_bytes: bytes,
    created_at: float,
    by: str,
    fields: dict[str, Any] | None = None,
) -> TaskRecord:
    """The record of a task with this spec, which it keeps as `spec_bytes` only (`fields`: its
    fields_of, when the caller has them)."""
    # One look at the fields set (most specs set few) instead of asking for each.
    if fields is None:
        fields = fields_of(spec)
    get = fields.get
    rec = TaskRecord(
        task_id,
        seq,
        spec_bytes,
        get("priority") or task_pb2.PRIORITY_NORMAL,
        requirements_of(spec, fields),
        get("tenant", ""),
        created_at,
        by,
    )
    if "backend" in fields:
        rec.backend = fields["backend"]
    if "locks" in fields:
        rec.locks = parse_locks(fields["locks"], rec.tenant)
    if "depends_on" in fields:
        rec.templated = b"${{" in spec_bytes and has_references(spec)
    if "llm" in fields:
        rec.routed = bool(spec.llm.routes)
    if "not_before" in fields:
        rec.release_at = spec.not_before.ToNanoseconds() / 1e9
    if "queue_timeout" in fields:
        rec.queue_timeout = spec.queue_timeout.ToNanoseconds() / 1e9
    return rec


def _scoped_key(spec: task_pb2.TaskSpec) -> str | None:
    """The stored idempotency key: unique within the task's tenant, so tenants never collide."""
    if not spec.idempotency_key:
        return None
    return f"{spec.tenant}\0{spec.idempotency_key}" if spec.tenant else spec.idempotency_key


def task_row(rec: TaskRecord, spec: task_pb2.TaskSpec) -> TaskRow:
    """The acceptance row of a new task (`rec`, made from `spec`)."""
    return TaskRow(
        rec.seq,
        rec.id,
        _scoped_key(spec),
        rec.tenant,
        rec.priority,
        rec.spec_bytes,
        rec.created_at,
        rec.submitted_by,
        [d.task_id if d.HasField("task_id") else d.batch_index for d in spec.depends_on],
        # A task with nothing unusual (no upstream, times, locks, routes: `more` is None) can
        # be queued again after a restart from its placement alone.
        plain_key(rec.placement) if rec.more is None else None,
        executor_of(spec),
        _labels(spec) if spec.required_labels or spec.metadata else [],
    )


def _labels(spec: task_pb2.TaskSpec) -> list[tuple[str, str]]:
    """The entries of a spec's required labels and metadata that List can filter on."""
    return [
        (k, v)
        for entries in (spec.required_labels, spec.metadata)
        for k, v in entries.items()
        if len(k) <= LABEL_CHARS and len(v) <= LABEL_CHARS
    ]


def finished_row(rec: TaskRecord, epoch: int) -> FinishedRow:
    """The outcome row of a final task; `epoch` (the coordinator's now) stands for the epoch of
    a task that never had an attempt. An attempt keeps the epoch that dispatched it, which an
    attempt kept across a restart is not."""
    return FinishedRow(
        id=rec.id,
        seq=rec.seq,
        state=rec.state,
        final_seq=rec.final_seq,
        finished_at=rec.finished_at or 0.0,
        started_at=rec.started_at,
        node_id=rec.node_id,
        attempt_epoch=rec.attempt_epoch if rec.attempt else epoch,
        attempt_number=rec.attempt,
        result=rec.result.SerializeToString() if rec.result else b"",
        finished_by=rec.finished_by,
        attempts=(
            task_pb2.Task(attempts=rec.attempts).SerializeToString() if rec.attempts else b""
        ),
    )


def attempt_id(rec: TaskRecord) -> task_pb2.AttemptId:
    return task_pb2.AttemptId(epoch=rec.attempt_epoch, number=rec.attempt)


def task_change(
    rec: TaskRecord,
    *,
    by: str,
    seq: int = 0,
    output: task_pb2.OutputChunk | None = None,
    time_ns: int = 0,
) -> Change:
    """The task's change now (or at `time_ns`), as an event (numbered by `seq`, or when
    emitted)."""
    return Change(
        rec.id,
        rec.state,
        seq=seq,
        node_id=rec.node_id,
        tenant=rec.tenant,
        principal=by,
        epoch=rec.attempt_epoch,
        number=rec.attempt,
        result=rec.result if rec.result is not None and is_final(rec.state) else None,
        output=output,
        time_ns=time_ns or time.time_ns(),
    )


def live_task(rec: TaskRecord, pending_reason: str) -> task_pb2.Task:
    """A task held in memory, as a Task message."""
    task = task_pb2.Task(
        id=rec.id,
        spec=rec.spec,
        state=rec.state,  # type: ignore[arg-type]
        node_id=rec.node_id,
        result=rec.result,
        created_at=timestamp(rec.created_at),
        started_at=timestamp(rec.started_at),
        finished_at=timestamp(rec.finished_at),
        pending_reason=pending_reason,
        created_seq=rec.seq,
        submitted_by=rec.submitted_by,
        attempts=rec.attempts,
        depends_on=rec.upstream,
    )
    if rec.attempt:
        task.attempt.CopyFrom(attempt_id(rec))
    if rec.progress is not None:
        task.progress.CopyFrom(rec.progress)
    return task


def stored_task(st: StoredTask) -> task_pb2.Task:
    """A task known only to the store, as a Task message."""
    row, outcome = st.row, st.outcome
    task = task_pb2.Task(
        id=row.id,
        spec=task_pb2.TaskSpec.FromString(row.spec),
        state=_QUEUED if outcome is None else outcome.state,  # type: ignore[arg-type]
        created_at=timestamp(row.created_at),
        created_seq=row.seq,
        submitted_by=row.submitted_by,
        depends_on=[str(u) for u in row.depends_on],
    )
    if outcome is not None:
        if outcome.attempts:
            task.attempts.extend(task_pb2.Task.FromString(outcome.attempts).attempts)
        task.node_id = outcome.node_id
        task.result.ParseFromString(outcome.result)
        task.finished_at.CopyFrom(timestamp(outcome.finished_at))
        if outcome.started_at is not None:
            task.started_at.CopyFrom(timestamp(outcome.started_at))
        if outcome.attempt_number:
            task.attempt.epoch = outcome.attempt_epoch
            task.attempt.number = outcome.attempt_number
    return task


def stored_event(seq: int, st: StoredTask) -> task_pb2.Event:
    """Event `seq` of a stored task, replayed: its acceptance, or its outcome."""
    row, outcome = st.row, st.outcome
    event = task_pb2.Event(seq=seq, task_id=row.id, tenant=row.tenant)
    if seq == row.seq or outcome is None:
        event.principal = row.submitted_by
        event.state = _QUEUED
        event.time.CopyFrom(timestamp(row.created_at))
    else:
        event.state = outcome.state  # type: ignore[assignment]
        event.principal = outcome.finished_by
        event.node_id = outcome.node_id
        event.result.ParseFromString(outcome.result)
        event.time.CopyFrom(timestamp(outcome.finished_at))
    return event
