"""TaskState: a task's state as a readable IntEnum, equal to the wire's numbers."""

from __future__ import annotations

import enum

from shoal.specs import is_final
from shoal.v1 import task_pb2

__all__ = ["TaskState"]


class TaskState(enum.IntEnum):
    """`shoal.v1.TaskState` by name: `TaskState(task.state)` prints as `SUCCEEDED` and compares
    equal to the proto's number (`task_pb2.TASK_STATE_SUCCEEDED`)."""

    UNSPECIFIED = task_pb2.TASK_STATE_UNSPECIFIED
    PENDING = task_pb2.TASK_STATE_PENDING
    QUEUED = task_pb2.TASK_STATE_QUEUED
    ASSIGNED = task_pb2.TASK_STATE_ASSIGNED
    RUNNING = task_pb2.TASK_STATE_RUNNING
    SUCCEEDED = task_pb2.TASK_STATE_SUCCEEDED
    FAILED = task_pb2.TASK_STATE_FAILED
    CANCELLED = task_pb2.TASK_STATE_CANCELLED
    TIMED_OUT = task_pb2.TASK_STATE_TIMED_OUT
    SKIPPED = task_pb2.TASK_STATE_SKIPPED

    def __str__(self) -> str:
        # IntEnum prints its number (Python 3.11+); a state reads better by name.
        return self.name

    @property
    def final(self) -> bool:
        """Whether the task has ended (succeeded, failed, cancelled, timed out or skipped)."""
        return is_final(self)
