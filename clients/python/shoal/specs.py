"""Helpers over task specs shared by the SDK, the coordinator and nodes."""

from __future__ import annotations

from shoal.v1 import task_pb2

__all__ = ["FINAL_STATES", "executor_of", "is_final", "state_name"]

FINAL_STATES = frozenset(
    {
        task_pb2.TASK_STATE_SUCCEEDED,
        task_pb2.TASK_STATE_FAILED,
        task_pb2.TASK_STATE_CANCELLED,
        task_pb2.TASK_STATE_TIMED_OUT,
        task_pb2.TASK_STATE_SKIPPED,
    }
)


def executor_of(spec: task_pb2.TaskSpec) -> str:
    """The name of the executor that runs a spec ('' when no kind is set)."""
    kind = spec.WhichOneof("kind")
    if kind == "custom":
        return spec.custom.executor
    return kind or ""


def is_final(state: int) -> bool:
    return state in FINAL_STATES


def state_name(state: int) -> str:
    """`TASK_STATE_SUCCEEDED` -> `SUCCEEDED`."""
    return task_pb2.TaskState.Name(state).removeprefix("TASK_STATE_")  # type: ignore[arg-type]
