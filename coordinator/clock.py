"""The coordinator's time: steady seconds for durations, the wall clock for calendar dates."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["MAX_STEP", "Clock"]

_log = logging.getLogger("shoal.coordinator")

MAX_STEP = 5.0
"""Seconds the wall clock may move apart from the monotonic one before it counts as a step."""


class Clock:
    """`now()` runs on the monotonic clock, counted from the wall time when the clock was made
    (so steady times and stored wall times compare across a restart); `wall()` is the date.

    Timeouts, TTLs, cooldowns, backoffs and buckets read `now()`: a wall-clock step moves none
    of them. Cron times and `not_before` dates read `wall()` and map to steady time through
    `from_wall`, whose offset moves only when `stepped` notices a step.
    """

    def __init__(
        self,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        max_step: float = MAX_STEP,
    ) -> None:
        self.monotonic = monotonic
        self.wall = wall
        self._max_step = max_step
        self._origin = wall() - monotonic()
        self._offset = 0.0  # wall() - now(), as of the last step noticed

    def now(self) -> float:
        """Steady seconds: monotonic, in the wall clock's units and (at the start) its value."""
        return self._origin + self.monotonic()

    def from_wall(self, at: float) -> float:
        """The steady time when the wall clock shows `at` (as of the last step noticed)."""
        return at - self._offset

    def to_wall(self, at: float) -> float:
        """The wall time shown at steady time `at` (as of the last step noticed)."""
        return at + self._offset

    def remaining(self, deadline: float, *, most: float) -> float:
        """A stored wall-clock deadline as a steady one: what is left of it by the wall clock
        now, within [0, `most`] (a deadline stored under a clock that was wrong stays bounded)."""
        return self.now() + min(max(0.0, deadline - self.wall()), most)

    def stepped(self) -> float:
        """Seconds the wall clock stepped since the last step noticed (0.0: none over
        max_step); a step is logged, and `from_wall` follows it from here on."""
        offset = self.wall() - self.now()
        step = offset - self._offset
        if abs(step) <= self._max_step:
            return 0.0
        self._offset = offset
        _log.warning(
            "wall clock stepped by %+.1f s: timeouts, TTLs and intervals keep their monotonic"
            " time; cron and not_before dates follow the wall clock",
            step,
        )
        return step
