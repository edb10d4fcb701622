"""Shoal's one exception tree. No gRPC here: `shoal._status` maps it to status codes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shoal.v1 import task_pb2

__all__ = [
    "AlreadyExists",
    "FailedPrecondition",
    "FieldViolation",
    "InternalError",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "RemoteError",
    "ResourceExhausted",
    "ShoalError",
    "TaskFailed",
    "Unauthenticated",
    "Unavailable",
    "WaitTimeout",
]


def _state_name(task: task_pb2.Task) -> str:
    """`SUCCEEDED` for TASK_STATE_SUCCEEDED, read from the message's own descriptor: this module
    imports no generated code (the store raises these errors and stays free of protobuf)."""
    states = task.DESCRIPTOR.fields_by_name["state"].enum_type
    value = states.values_by_number.get(task.state) if states else None
    return value.name.removeprefix("TASK_STATE_") if value else str(task.state)


class ShoalError(Exception):
    """Base of every error Shoal raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request: `field` is a path such as `specs[3].shell.argv`."""

    field: str
    description: str


class InvalidArgument(ShoalError):
    """The request is malformed; nothing was changed."""

    def __init__(self, message: str, violations: list[FieldViolation] | None = None) -> None:
        super().__init__(message)
        self.violations: list[FieldViolation] = violations or []


class NotFound(ShoalError):
    """The named task, node or object does not exist."""


class AlreadyExists(ShoalError):
    """The object to create exists already."""


class FailedPrecondition(ShoalError):
    """The request is valid but the object is not in a state that allows it."""


class ResourceExhausted(ShoalError):
    """A size, quota or capacity limit was hit; `retry_after` says when trying again may work."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: timedelta | None = None,
        violations: list[FieldViolation] | None = None,
        quota: list[FieldViolation] | None = None,
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.violations: list[FieldViolation] = violations or []
        # Which quotas: (subject, description), e.g. ("tenant:acme", "submits per second").
        self.quota: list[FieldViolation] = quota or []


class PermissionDenied(ShoalError):
    """The caller is known but may not do this."""


class Unauthenticated(ShoalError):
    """The caller presented no valid credentials."""


class Unavailable(ShoalError):
    """The service cannot take the call now (starting, shutting down, unreachable)."""


class InternalError(ShoalError):
    """A bug: something Shoal did not expect."""


class TaskFailed(ShoalError):
    """A task the SDK ran for its result ended without succeeding; `task` is how it ended.
    Raised by the SDK, never by a server: it maps to no status code."""

    def __init__(self, task: task_pb2.Task) -> None:
        why = task.result.error or task.result.stderr.strip()[-500:]
        super().__init__(f"task {task.id} {_state_name(task)}" + (f": {why}" if why else ""))
        self.task = task


class RemoteError(TaskFailed):
    """A function task raised: `remote_type` is the exception's type ("builtins.ValueError"),
    `remote_message` its text and `remote_traceback` the traceback as the node printed it."""

    def __init__(
        self, task: task_pb2.Task, remote_type: str, remote_message: str, remote_traceback: str
    ) -> None:
        super().__init__(task)
        self.message = f"task {task.id} raised {remote_type}: {remote_message}"
        self.args = (self.message,)
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        return f"{self.message}\n\nRemote traceback:\n{self.remote_traceback}"


class WaitTimeout(ShoalError):
    """A wait with a timeout ended before the task did; `task` is how it was then.
    Raised by the SDK, never by a server: it maps to no status code."""

    def __init__(self, task: task_pb2.Task, timeout: timedelta) -> None:
        why = f" ({task.pending_reason})" if task.pending_reason else ""
        super().__init__(
            f"task {task.id} still {_state_name(task)} after {timeout.total_seconds():g} s" + why
        )
        self.task = task
