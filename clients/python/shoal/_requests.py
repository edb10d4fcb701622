"""The task calls' requests as both clients build them, and how a waiting answer is read."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import timedelta

from google.protobuf.duration_pb2 import Duration

from shoal.errors import WaitTimeout
from shoal.specs import is_final, to_duration
from shoal.v1 import task_pb2, tasks_pb2

__all__ = ["execute_request", "submit_batch_request", "submit_request", "wait_request", "waited"]


def submit_request(spec: task_pb2.TaskSpec) -> tasks_pb2.SubmitRequest:
    """A Submit of `spec`, with a request id of its own: resent, it stores no second task."""
    return tasks_pb2.SubmitRequest(spec=spec, request_id=uuid.uuid4().hex)


def submit_batch_request(specs: Iterable[task_pb2.TaskSpec]) -> tasks_pb2.SubmitBatchRequest:
    return tasks_pb2.SubmitBatchRequest(specs=list(specs), request_id=uuid.uuid4().hex)


def _bounded(field: Duration, timeout: timedelta | None, call_timeout: float) -> float | None:
    """Set a wait's bound `field` to `timeout` (None: none); the call's deadline."""
    if timeout is None:
        return None
    field.CopyFrom(to_duration(timeout))
    return timeout.total_seconds() + call_timeout


def wait_request(
    task_id: str, timeout: timedelta | None, call_timeout: float
) -> tuple[tasks_pb2.WaitRequest, float | None]:
    """A Wait for `task_id` for up to `timeout` (None: until it ends), and the call's deadline."""
    request = tasks_pb2.WaitRequest(task_id=task_id)
    return request, _bounded(request.timeout, timeout, call_timeout)


def execute_request(
    spec: task_pb2.TaskSpec, timeout: timedelta | None, call_timeout: float
) -> tuple[tasks_pb2.SubmitRequest, float | None]:
    """A Submit of `spec` that waits up to `timeout` (None: until it ends), and the call's
    deadline."""
    request = submit_request(spec)
    request.wait = True
    return request, _bounded(request.wait_timeout, timeout, call_timeout)


def waited(task: task_pb2.Task, timeout: timedelta | None) -> task_pb2.Task:
    """`task` as a Wait answered it; WaitTimeout when `timeout` passed before it ended."""
    if timeout is not None and not is_final(task.state):
        raise WaitTimeout(task, timeout)
    return task
