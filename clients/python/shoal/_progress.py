"""`shoal.progress(0.45, "45 of 100 files")`: how far the running task is, from inside it.

In a function task it goes straight to the node's worker pipe; in a shell or python task to
the file descriptor the node passes in `SHOAL_PROGRESS_FD` (also open as the path in
`SHOAL_PROGRESS`), one line per report: `<fraction> <message>`. Elsewhere (a function
called locally) it does nothing.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable

__all__ = [
    "INTERVAL",
    "PROGRESS_FD",
    "PROGRESS_PATH",
    "Sampler",
    "format_line",
    "progress",
    "set_sink",
]

PROGRESS_FD = "SHOAL_PROGRESS_FD"
PROGRESS_PATH = "SHOAL_PROGRESS"  # /dev/fd/N, for shells: echo "0.5 half" >"$SHOAL_PROGRESS"

INTERVAL = 0.1
"""Seconds between two progress reports of one task that are passed on."""

_sink: Callable[[float, str], None] | None = None


class Sampler:
    """Which of a task's progress reports to pass on: at most one every INTERVAL, but the
    first at 1 (which is the last to tell) whenever it comes."""

    __slots__ = ("_at", "_done")

    def __init__(self) -> None:
        self._at = -math.inf  # when the last report passed on was made (monotonic)
        self._done = False  # whether it said 1

    def passes(self, fraction: float, now: float) -> bool:
        done = fraction == 1.0
        if now - self._at < INTERVAL and (not done or self._done):
            return False
        self._at, self._done = now, done
        return True


def set_sink(sink: Callable[[float, str], None] | None) -> None:
    """Where progress goes in this process (a function worker sets it)."""
    global _sink
    _sink = sink


def format_line(fraction: float, message: str) -> bytes:
    """One line of the progress protocol (the message on one line, at most 200 characters)."""
    text = " ".join(message.split())[:200]
    return f"{fraction:.6g} {text}".rstrip().encode() + b"\n"


def progress(fraction: float, message: str = "") -> None:
    """Say how far the running task is: `fraction` from 0 to 1 (clamped), and what it does."""
    fraction = float(fraction)
    message = "" if message is None else str(message)
    if not math.isfinite(fraction):
        return
    fraction = min(1.0, max(0.0, fraction))
    if _sink is not None:
        _sink(fraction, message)
        return
    fd = os.environ.get(PROGRESS_FD, "")
    if fd.isdigit():
        with contextlib.suppress(OSError):
            os.write(int(fd), format_line(fraction, message))
