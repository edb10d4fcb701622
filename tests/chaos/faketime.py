"""A wall clock that a test steps under a running process: libfaketime, preloaded into it.

Only the wall clock moves (FAKETIME_DONT_FAKE_MONOTONIC=1), as with an NTP step or a date set
by hand; the offset is read again from a file at every call (FAKETIME_NO_CACHE=1), so a step
takes effect at once. Debian: `apt-get install faketime`.

libfaketime 0.9.10 breaks CPython >= 3.11's sleep function in that mode (its
clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME) gets a negative time: EINVAL). The coordinator
never calls it (asyncio waits in epoll with relative timeouts), so it runs under libfaketime.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["LIBFAKETIME", "SteppedWallClock", "libfaketime_unavailable"]

# The multi-threaded build: the coordinator reads the clock from several threads (gRPC's, the
# store writer's), and the plain build keeps unsynchronised state behind time().
LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")


def libfaketime_unavailable() -> str:
    """Why this machine cannot step a process's wall clock ('' when it can)."""
    if not LIBFAKETIME.exists():
        return f"{LIBFAKETIME} is missing (apt-get install faketime)"
    return ""


class SteppedWallClock:
    """The wall clock of the processes started with `env()`, `offset` seconds off the real one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self._write()

    def env(self) -> dict[str, str]:
        """What to add to a process's environment so that its wall clock follows `step`."""
        preload = " ".join(p for p in (str(LIBFAKETIME), os.environ.get("LD_PRELOAD", "")) if p)
        return {
            "LD_PRELOAD": preload,
            "FAKETIME_TIMESTAMP_FILE": str(self.path),
            "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        }

    def step(self, seconds: int) -> None:
        """Step the wall clock by `seconds` (back when negative), as of now."""
        self.offset += seconds
        self._write()

    def _write(self) -> None:
        # A relative offset in seconds ("+3600", "-60"); written whole, then renamed into
        # place, so that a reader never sees half a line.
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(f"{self.offset:+d}\n")
        tmp.replace(self.path)
