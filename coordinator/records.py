"""The coordinator's in-memory record of a live (or recently finished) task."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

from shoal.coordinator.placement import Requirements
from shoal.v1 import task_pb2

__all__ = ["TaskRecord"]


_T = TypeVar("_T")


class _Rare(Generic[_T]):
    """A field most records never set: it lives in the record's `more` dict, made the first
    time one is set to anything but its default. A record then holds 8 bytes for all of them,
    and a queued task with none set is told by one look (`more is None`)."""

    __slots__ = ("default", "name")

    def __init__(self, default: _T) -> None:
        self.default = default
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, rec: None, owner: type) -> _Rare[_T]: ...

    @overload
    def __get__(self, rec: TaskRecord, owner: type) -> _T: ...

    def __get__(self, rec: TaskRecord | None, owner: type) -> _T | _Rare[_T]:
        if rec is None:
            return self
        more = rec.more
        return self.default if more is None else more.get(self.name, self.default)

    def __set__(self, rec: TaskRecord, value: _T) -> None:
        more = rec.more
        if more is None:
            if value == self.default:
                return
            more = rec.more = {}
        more[self.name] = value


@dataclass(eq=False, slots=True)
class TaskRecord:
    id: str
    seq: int
    # The spec as stored; parsed at first use (`spec`). A queued task keeps only these bytes,
    # not a message: a parsed spec costs several times more, and one taken from a request
    # would keep the whole request's memory alive.
    spec_bytes: bytes
    priority: int  # 1..5
    placement: Requirements
    tenant: str
    created_at: float
    submitted_by: str = ""
    state: int = task_pb2.TASK_STATE_QUEUED
    attempt: int = 0  # the number of its current (or last) attempt
    attempt_epoch: int = 0  # the coordinator epoch that made that attempt
    node_id: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    result: task_pb2.TaskResult | None = None
    final_seq: int = 0
    finished_by: str = ""  # the principal that made it final
    durable: bool = False  # its outcome is committed
    tag: float = 0.0  # its fair-share tag while queued (the scheduler's)
    parsed: task_pb2.TaskSpec | None = None  # `spec`, once parsed
    more: dict[str, Any] | None = None  # the fields below that are set

    backend = _Rare("")  # spec.backend: the outside service whose breaker it passes
    routed = _Rare(False)  # an llm task with routes: its provider is chosen when it is queued
    locks = _Rare[tuple[tuple[str, bool], ...]](())  # (name, shared), from spec.locks
    held_by = _Rare("")  # the admission key it waits on (PENDING), e.g. "quota:provider:x"
    wait_reason = _Rare("")  # why, while held
    cancel_requested = _Rare(False)
    upstream = _Rare[Sequence[str]](())  # depends_on, resolved, in order
    waiting_on = _Rare[set[str] | None](None)  # upstream ids not final yet
    upstream_results = _Rare[dict[str, task_pb2.TaskResult] | None](None)
    templated = _Rare(False)  # its spec refers to upstream results
    skip_reason = _Rare("")  # an upstream failed: it will be SKIPPED
    attempts = _Rare[tuple[task_pb2.Attempt, ...]](())  # earlier, failed ones
    release_at = _Rare[float | None](None)  # wall time it may be queued (not_before, backoff)
    waiters = _Rare[list[asyncio.Future[None]] | None](None)
    queue_timeout = _Rare[float | None](None)  # spec.queue_timeout, in seconds
    queue_deadline = _Rare[float | None](None)  # when that ends, in steady time (clock.Clock)
    progress = _Rare[task_pb2.Progress | None](None)  # what its running attempt last said

    @property
    def spec(self) -> task_pb2.TaskSpec:
        """The task's spec (parsed from spec_bytes at first use; do not modify it)."""
        if self.parsed is None:
            self.parsed = task_pb2.TaskSpec.FromString(self.spec_bytes)
        return self.parsed

    @spec.setter
    def spec(self, spec: task_pb2.TaskSpec) -> None:
        self.parsed, self.spec_bytes = spec, spec.SerializeToString()

    @property
    def queued(self) -> bool:
        return self.state == task_pb2.TASK_STATE_QUEUED
