"""The task calls' requests as both clients build them, and how a waiting answer is read."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import timedelta

from google.protobuf.duration_pb2 import Duration

from shoal.errors import WaitTimeout
from shoal.specs import is_final, span, to_duration
from shoal.v1 import task_pb2, tasks_pb2

__all__ = [
    "Timeout",
    "execute_request",
    "submit_batch_request",
    "submit_request",
    "wait_request",
    "waited",
]

Timeout = timedelta | float | None
"""How long a wait may last: a timedelta or seconds; None: until the task ends."""


def submit_request(spec: task_pb2.TaskSpec) -> tasks_pb2.SubmitRequest:
    """A Submit of `spec`, with a request id of its own: resent, it stores no second task."""
    return tasks_pb2.SubmitRequest(spec=spec, request_id=uuid.uuid4().hex)


def submit_batch_request(specs: Iterable[task_pb2.TaskSpec]) -> tasks_pb2.SubmitBatchRequest:
    return tasks_pb2.SubmitBatchRequest(specs=list(specs), request_id=uuid.uuid4().hex)


def _bounded(field: Duration, wait: Timeout, call_timeout: float) -> float | None:
    """Set a wait's bound `field` to `wait` (None: none); the call's deadline."""
    timeout = span(wait, "timeout")
    if timeout is None:
        return None
    field.CopyFrom(to_duration(timeout))
    return timeout.total_seconds() + call_timeout


def wait_request(
    task_id: str, timeout: Timeout, call_timeout: float
) -> tuple[tasks_pb2.WaitRequest, float | None]:
    """A Wait for `task_id` for up to `timeout` (None: until it ends), and the call's deadline."""
    request = tasks_pb2.WaitRequest(task_id=task_id)
    return request, _bounded(request.timeout, timeout, call_timeout)


def execute_request(
    spec: task_pb2.TaskSpec, timeout: Timeout, call_timeout: float
) -> tuple[tasks_pb2.SubmitRequest, float | None]:
    """A Submit of `spec` that waits up to `timeout` (None: until it ends), and the call's
    deadline."""
    request = submit_request(spec)
    request.wait = True
    return request, _bounded(request.wait_timeout, timeout, call_timeout)


def waited(task: task_pb2.Task, wait: Timeout) -> task_pb2.Task:
    """`task` as a Wait answered it; WaitTimeout when `wait` passed before it ended."""
    timeout = span(wait, "timeout")
    if timeout is not None and not is_final(task.state):
        raise WaitTimeout(task, timeout)
    return task
