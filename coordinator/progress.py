"""What a running task says of its progress, as the coordinator keeps and passes it on:
clamped, bounded, rate-limited per task, with an estimated end from the rate so far."""

from __future__ import annotations

import math

from shoal.specs import printable, timestamp
from shoal.v1 import task_pb2

__all__ = ["MAX_MESSAGE", "MIN_INTERVAL", "accepted_progress"]

MIN_INTERVAL = 0.1
"""Seconds between two progress events of one task: a task that reports faster is sampled."""
MAX_MESSAGE = 200
MIN_ELAPSED = 1.0  # seconds run before an end is estimated


def accepted_progress(
    reported: task_pb2.Progress,
    last: task_pb2.Progress | None,
    *,
    now: float,
    started_at: float | None,
) -> task_pb2.Progress | None:
    """The progress to keep and announce (None: drop it: too soon after `last`, or not a
    number). `now` and `started_at` are wall-clock seconds."""
    fraction = reported.fraction
    if not math.isfinite(fraction):
        return None
    fraction = min(1.0, max(0.0, fraction))
    message = printable(reported.message, MAX_MESSAGE)
    if last is not None:
        since = now - last.updated_at.ToNanoseconds() / 1e9
        if 0 <= since < MIN_INTERVAL and fraction < 1.0:
            return None
    progress = task_pb2.Progress(fraction=fraction, message=message, updated_at=timestamp(now))
    # From a second of work on: an estimate from the first instants says nothing.
    if started_at is not None and fraction > 0 and now - started_at >= MIN_ELAPSED:
        elapsed = now - started_at
        progress.estimated_end.CopyFrom(timestamp(now + elapsed * (1 - fraction) / fraction))
    return progress
