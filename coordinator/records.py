"""The coordinator's in-memory record of a live (or recently finished) task."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from shoal.coordinator.scheduler import Requirements
from shoal.v1 import task_pb2

__all__ = ["TaskRecord"]


@dataclass(eq=False, slots=True)
class TaskRecord:
    id: str
    seq: int
    spec: task_pb2.TaskSpec
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
    upstream: list[str] = field(default_factory=list)  # depends_on, resolved, in order
    waiting_on: set[str] = field(default_factory=set)  # upstream ids not final yet
    upstream_results: dict[str, task_pb2.TaskResult] = field(default_factory=dict)
    templated: bool = False  # its spec refers to upstream results
    skip_reason: str = ""  # an upstream failed: it will be SKIPPED
    attempts: list[task_pb2.Attempt] = field(default_factory=list)  # earlier, failed ones
    release_at: float | None = None  # wall time it may be queued (not_before, retry backoff)
    durable: bool = False  # its outcome is committed
    waiters: list[asyncio.Future[None]] = field(default_factory=list)

    @property
    def queued(self) -> bool:
        return self.state == task_pb2.TASK_STATE_QUEUED
