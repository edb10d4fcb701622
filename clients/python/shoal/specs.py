"""Helpers over task specs shared by the SDK, the coordinator and nodes."""

from __future__ import annotations

import math
import re
from datetime import timedelta
from typing import Any, overload

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from shoal.errors import FieldViolation, InvalidArgument
from shoal.v1 import task_pb2

__all__ = [
    "FINAL_STATES",
    "MAX_DURATION",
    "SECRET_REFERENCE",
    "bounded_result",
    "duration",
    "executor_of",
    "fields_of",
    "is_final",
    "printable",
    "secret_references",
    "state_name",
    "timestamp",
    "to_duration",
]

MAX_DURATION = timedelta(seconds=315_576_000_000)
"""The range google.protobuf.Duration documents (10,000 years); timedelta overflows far beyond."""

FINAL_STATES = frozenset(
    {
        task_pb2.TASK_STATE_SUCCEEDED,
        task_pb2.TASK_STATE_FAILED,
        task_pb2.TASK_STATE_CANCELLED,
        task_pb2.TASK_STATE_TIMED_OUT,
        task_pb2.TASK_STATE_SKIPPED,
    }
)


SECRET_REFERENCE = re.compile(r"\$\{\{\s*secrets\.([A-Za-z0-9_][A-Za-z0-9_.-]*)\s*\}\}")
"""`${{ secrets.NAME }}` in an http task's header value: the node puts in the value of NAME, a
secret the task lists in `secrets`. The coordinator keeps the reference, never the value."""


def secret_references(spec: task_pb2.TaskSpec) -> list[str]:
    """The names of the secrets that an http task's header values refer to, in order."""
    if spec.WhichOneof("kind") != "http":
        return []
    return [
        m.group(1)
        for value in spec.http.headers.values()
        if "${{" in value
        for m in SECRET_REFERENCE.finditer(value)
    ]


def fields_of(spec: task_pb2.TaskSpec) -> dict[str, Any]:
    """The fields a spec sets, by name: one pass, cheaper than asking for each in turn."""
    return {fd.name: value for fd, value in spec.ListFields()}


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


def duration(d: Duration, field: str, *, positive: bool = False) -> timedelta:
    """A request's Duration as timedelta; InvalidArgument when negative (or zero with
    `positive`) or beyond the range Duration documents."""
    seconds, nanos = d.seconds, d.nanos
    if seconds < 0 or nanos < 0 or nanos >= 1_000_000_000 or seconds > MAX_DURATION.days * 86400:
        raise InvalidArgument(f"{field} must be between 0 and {MAX_DURATION.days} days")
    if positive and not (seconds or nanos):
        raise InvalidArgument(f"{field} must be positive")
    return timedelta(seconds=seconds, microseconds=nanos // 1000)


_LAST_SECOND = 253402300799  # 9999-12-31T23:59:59Z, the last a Timestamp may hold


def instant(ts: Timestamp, field: str) -> float:
    """A request's Timestamp as wall-clock seconds; InvalidArgument naming `field` when it is
    not a time between 1970 and 9999."""
    if not 0 <= ts.seconds <= _LAST_SECOND or not 0 <= ts.nanos < 1_000_000_000:
        raise InvalidArgument(
            f"{field} must be a time between 1970 and 9999",
            [FieldViolation(field, "must be a time between 1970 and 9999")],
        )
    return ts.seconds + ts.nanos / 1e9


@overload
def timestamp(seconds: float) -> Timestamp: ...
@overload
def timestamp(seconds: float | None) -> Timestamp | None: ...


def timestamp(seconds: float | None) -> Timestamp | None:
    """Wall-clock seconds as a Timestamp; None stays None (an unset field)."""
    if seconds is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def span(value: timedelta | float | None, name: str) -> timedelta | None:
    """A span given as a timedelta or seconds, as a timedelta (None stays None); ValueError
    unless it is finite and at least 0, TypeError when it is neither."""
    if value is None or isinstance(value, timedelta):
        out = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a number of seconds, not {value}")
        out = timedelta(seconds=value)
    else:
        raise TypeError(f"{name} must be a timedelta or seconds, not {type(value).__name__}")
    if out is not None and out < timedelta(0):
        raise ValueError(f"{name} must be at least 0, not {out.total_seconds():g} s")
    return out


def to_duration(td: timedelta) -> Duration:
    d = Duration()
    d.FromTimedelta(td)
    return d


def bounded_result(result: task_pb2.TaskResult, limit: int) -> task_pb2.TaskResult:
    """A node's result cut to `limit` bytes: the output tails keep their ends, and give way to
    the structured output (a function's return value), which is dropped only when it does not
    fit by itself."""
    if result.ByteSize() <= limit:
        return result
    result.error = result.error[: limit // 4]
    tails = ("stdout", "stderr", "stdout_raw", "stderr_raw")
    kept = [getattr(result, name) for name in tails]
    result.stdout = result.stderr = ""
    result.stdout_raw = result.stderr_raw = b""
    if result.ByteSize() > limit:
        result.ClearField("output")
        result.error = (result.error + " (structured output dropped: over the size limit)")[
            : limit // 4
        ]
    share = max(0, limit - result.ByteSize() - 64) // 4  # 64: the tails' own field headers
    while share:  # characters: fewer when they are not ASCII
        for name, tail in zip(tails, kept, strict=True):
            setattr(result, name, tail[-share:])
        if result.ByteSize() <= limit:
            break
        share //= 2
    return result


def printable(text: str, most: int) -> str:
    """`text` without the characters that are not printable (a terminal's escape sequences
    among them), cut at `most`."""
    return "".join(c for c in text[: most * 2] if c.isprintable())[:most]
