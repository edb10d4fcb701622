"""A task's execution timeout, whose clock stops while the task is paused."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

__all__ = ["PausableDeadline"]


class PausableDeadline:
    """`async with deadline.running(seconds)`: TimeoutError once the block has run for
    `seconds` *not paused*. `pause` stops the clock and `resume` lets it go on with what it had
    left; either may come before the block starts, or after it ends (then it changes nothing).
    """

    def __init__(self) -> None:
        self._timeout: asyncio.Timeout | None = None
        self._left: float | None = None  # seconds left when the clock stopped
        self._paused = False

    @contextlib.asynccontextmanager
    async def running(self, seconds: float | None) -> AsyncIterator[None]:
        """The block the timeout applies to (`seconds` None: none)."""
        async with asyncio.timeout(seconds) as timeout:
            self._timeout = timeout
            if self._paused:
                self._stop_clock()
            try:
                yield
            finally:
                self._timeout = None
                self._left = None

    @property
    def left(self) -> float | None:
        """Seconds left before the timeout (None: no timeout running)."""
        t = self._timeout
        if t is None or (when := t.when()) is None:
            return self._left
        return max(0.0, when - asyncio.get_running_loop().time())

    def pause(self) -> None:
        """Stop the clock (until `resume`)."""
        self._paused = True
        self._stop_clock()

    def resume(self) -> None:
        """Let the clock go on with the time it had left."""
        self._paused = False
        t = self._timeout
        if t is not None and self._left is not None and not t.expired():
            t.reschedule(asyncio.get_running_loop().time() + self._left)
        self._left = None

    def _stop_clock(self) -> None:
        t = self._timeout
        if t is None or self._left is not None or t.expired() or (when := t.when()) is None:
            return
        self._left = max(0.0, when - asyncio.get_running_loop().time())
        t.reschedule(None)
