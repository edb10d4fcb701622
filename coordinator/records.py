"""The coordinator's in-memory record of a live (or recently finished) task."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from shoal.coordinator.scheduler import Requirements
from shoal.v1 import task_pb2

__all__ = ["TaskRecord"]


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
    backend: str = ""  # spec.backend: the outside service whose breaker it passes
    routed: bool = False  # an llm task with routes: its provider is chosen when it is queued
    locks: tuple[tuple[str, bool], ...] = ()  # (name, shared), from spec.locks
    held_by: str = ""  # the admission key it waits on (PENDING), e.g. "quota:provider:x"
    wait_reason: str = ""  # why, while held
    node_id: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    result: task_pb2.TaskResult | None = None
    final_seq: int = 0
    cancel_requested: bool = False
    finished_by: str = ""  # the principal that made it final
    # Containers stay shared empty ones until a task needs its own: most never do, and a
    # million queued tasks would hold a million empty sets.
    upstream: Sequence[str] = ()  # depends_on, resolved, in order
    waiting_on: set[str] | None = None  # upstream ids not final yet
    upstream_results: dict[str, task_pb2.TaskResult] | None = None
    templated: bool = False  # its spec refers to upstream results
    skip_reason: str = ""  # an upstream failed: it will be SKIPPED
    attempts: tuple[task_pb2.Attempt, ...] = ()  # earlier, failed ones
    release_at: float | None = None  # wall time it may be queued (not_before, retry backoff)
    durable: bool = False  # its outcome is committed
    waiters: list[asyncio.Future[None]] | None = None
    queue_timeout: float | None = None  # spec.queue_timeout, in seconds
    tag: float = 0.0  # its fair-share tag while queued (the scheduler's)
    parsed: task_pb2.TaskSpec | None = None  # `spec`, once parsed

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
