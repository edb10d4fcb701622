"""Task states as the engine tests them, and the empty result."""

from shoal.v1 import task_pb2

__all__ = [
    "ASSIGNED",
    "CANCELLED",
    "FAILED",
    "NO_RESULT",
    "PENDING",
    "QUEUED",
    "RUNNING",
    "SKIPPED",
    "SUCCEEDED",
    "TIMED_OUT",
]

PENDING = task_pb2.TASK_STATE_PENDING
QUEUED = task_pb2.TASK_STATE_QUEUED
ASSIGNED = task_pb2.TASK_STATE_ASSIGNED
RUNNING = task_pb2.TASK_STATE_RUNNING
CANCELLED = task_pb2.TASK_STATE_CANCELLED
FAILED = task_pb2.TASK_STATE_FAILED
SUCCEEDED = task_pb2.TASK_STATE_SUCCEEDED
SKIPPED = task_pb2.TASK_STATE_SKIPPED
TIMED_OUT = task_pb2.TASK_STATE_TIMED_OUT
NO_RESULT = task_pb2.TaskResult()
