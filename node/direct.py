"""Tasks run directly on a node by a caller of its own service, with no coordinator.

The node runs them like the tasks its coordinator assigns (same executors, secrets, redaction,
timeouts and slots); this module keeps what their callers see: each task's state, its updates
while someone follows it, and finished tasks for a while so that they can still be read.
"""

from __future__ import annotations

import asyncio
import collections
import secrets
import time
from collections.abc import AsyncIterator, Callable, Collection
from datetime import timedelta

from shoal.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
)
from shoal.node.executors.base import Outcome
from shoal.specs import executor_of
from shoal.v1 import node_pb2, task_pb2
from shoal.validation import Limits, validate_batch

__all__ = ["DirectTask", "DirectTasks", "check_direct_request"]

_LIMITS = Limits()
_MAX_BUFFERED = 10_000  # updates waiting for a slow follower; output beyond is dropped


def check_direct_request(spec: task_pb2.TaskSpec, task_id: str, executors: Collection[str]) -> None:
    """Raise InvalidArgument (or FailedPrecondition: no such executor here) unless this node
    can run `spec` now, as the coordinator would check it, and `task_id` is a usable id."""
    violations: list[FieldViolation] = []
    try:
        validate_batch([spec], _LIMITS, single=True)
    except InvalidArgument as err:
        violations += err.violations
    # What only a coordinator can honour: a direct task runs now, on its own.
    if spec.depends_on:
        violations.append(FieldViolation("spec.depends_on", "a task run on a node has no upstream"))
    if spec.HasField("not_before"):
        violations.append(FieldViolation("spec.not_before", "a task run on a node starts now"))
    if len(task_id) > _LIMITS.max_string or not task_id.isprintable():
        violations.append(
            FieldViolation("task_id", f"must be printable, at most {_LIMITS.max_string} characters")
        )
    if violations:
        first = violations[0]
        more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
        raise InvalidArgument(f"{first.field}: {first.description}{more}", violations)
    executor = executor_of(spec)
    if executor not in executors:
        raise FailedPrecondition(
            f"executor {executor!r} is not available on this node"
            f" (it has {', '.join(sorted(executors)) or 'none'})"
        )


class DirectTask:
    """One direct task as its caller sees it; told of its run's progress (a RunReport)."""

    def __init__(
        self, task_id: str, *, wall: Callable[[], float], on_end: Callable[[DirectTask], None]
    ) -> None:
        self.id = task_id
        self.state: task_pb2.TaskState.ValueType = task_pb2.TASK_STATE_ASSIGNED
        self.result: task_pb2.TaskResult | None = None
        self.started_at: float | None = None  # wall-clock seconds
        self.finished_at: float | None = None
        self.ended = asyncio.Event()
        self._wall = wall
        self._on_end = on_end
        self._follower: asyncio.Queue[node_pb2.ExecuteUpdate] | None = None

    def snapshot(self) -> node_pb2.LocalTask:
        """The task as it is now."""
        task = node_pb2.LocalTask(id=self.id, state=self.state, result=self.result)
        if self.started_at is not None:
            task.started_at.FromNanoseconds(int(self.started_at * 1e9))
        if self.finished_at is not None:
            task.finished_at.FromNanoseconds(int(self.finished_at * 1e9))
        return task

    def follow(self) -> AsyncIterator[node_pb2.ExecuteUpdate]:
        """Its updates from now on, up to and including the last (`finished`).

        One follower at a time: the Execute call that started it. Following starts at once,
        not at the first iteration, so that nothing said in between is lost.
        """
        queue: asyncio.Queue[node_pb2.ExecuteUpdate] = asyncio.Queue()
        self._follower = queue
        if self.ended.is_set():
            queue.put_nowait(node_pb2.ExecuteUpdate(task_id=self.id, finished=self.snapshot()))
        return self._updates(queue)

    async def _updates(
        self, queue: asyncio.Queue[node_pb2.ExecuteUpdate]
    ) -> AsyncIterator[node_pb2.ExecuteUpdate]:
        try:
            while True:
                update = await queue.get()
                yield update
                if update.HasField("finished"):
                    return
        finally:
            if self._follower is queue:
                self._follower = None  # gone: the task runs on, and nothing is buffered

    def _tell(self, update: node_pb2.ExecuteUpdate, *, droppable: bool = False) -> None:
        queue = self._follower
        if queue is not None and not (droppable and queue.qsize() >= _MAX_BUFFERED):
            queue.put_nowait(update)

    # -- RunReport -------------------------------------------------------------------------

    def started(self) -> None:
        self.state = task_pb2.TASK_STATE_RUNNING
        self.started_at = self._wall()
        self._tell(node_pb2.ExecuteUpdate(task_id=self.id, started=self.snapshot()))

    def output(self, chunk: task_pb2.OutputChunk) -> None:
        self._tell(node_pb2.ExecuteUpdate(task_id=self.id, output=chunk), droppable=True)

    def progress(self, progress: task_pb2.Progress) -> None:
        text = f"{progress.fraction:.0%} {progress.message}".rstrip() + "\n"
        chunk = task_pb2.OutputChunk(stream=task_pb2.OUTPUT_STREAM_PROGRESS, data=text)
        self._tell(node_pb2.ExecuteUpdate(task_id=self.id, output=chunk), droppable=True)

    def finished(self, outcome: Outcome) -> None:
        self.state = outcome.state  # type: ignore[assignment]
        self.result = outcome.result
        self.finished_at = self._wall()
        self.ended.set()
        self._on_end(self)
        self._tell(node_pb2.ExecuteUpdate(task_id=self.id, finished=self.snapshot()))

    def released(self, why: str, outcome: Outcome) -> None:
        self.finished(outcome)  # nowhere else to run it: how it stopped is how it ended


class DirectTasks:
    """The node's direct tasks by id: every running one, and finished ones for `keep_for`
    (at most `keep` of them, the oldest forgotten first)."""

    def __init__(
        self,
        *,
        keep: int = 1000,
        keep_for: timedelta = timedelta(hours=1),
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._keep = keep
        self._keep_for = keep_for.total_seconds()
        self._wall = wall
        self._clock = clock
        self._tasks: dict[str, DirectTask] = {}
        self._finished: collections.OrderedDict[str, float] = collections.OrderedDict()

    def new(self, task_id: str = "") -> DirectTask:
        """A new task under `task_id` (default: a new id); AlreadyExists if one is kept."""
        self._forget_old()
        task_id = task_id or secrets.token_hex(8)
        if task_id in self._tasks:
            raise AlreadyExists(f"task {task_id} exists on this node")
        task = DirectTask(task_id, wall=self._wall, on_end=self._ended)
        self._tasks[task_id] = task
        return task

    def get(self, task_id: str) -> DirectTask:
        self._forget_old()
        task = self._tasks.get(task_id)
        if task is None:
            raise NotFound(f"no task {task_id!r} on this node (or it ended long ago)")
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    def _ended(self, task: DirectTask) -> None:
        self._finished[task.id] = self._clock()
        self._forget_old()

    def _forget_old(self) -> None:
        horizon = self._clock() - self._keep_for
        while self._finished:
            task_id, ended = next(iter(self._finished.items()))
            if ended > horizon and len(self._finished) <= self._keep:
                return
            del self._finished[task_id]
            del self._tasks[task_id]
