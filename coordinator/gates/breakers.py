"""Circuit breakers: stop sending work where it keeps failing for reasons not its own.

A breaker guards a key: `node:<id>` (the node as a whole), `node:<id>/<executor>` (one
executor of a node) or `backend:<name>` (an outside service tasks name in `spec.backend`, across
the mesh). Consecutive infrastructure failures open it (a task's own failure, such as a non-zero
exit, is not one and neither breaks nor extends a run); while open nothing is dispatched to the
key; after the cooldown it is half-open and lets one task through as a probe, whose outcome
closes it or opens it for another cooldown. Results of tasks dispatched before it opened change
nothing while it is open.

This module is the state machine only; the coordinator applies what each state means.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from shoal.coordinator.gates.keys import backend_key, executor_key, node_key
from shoal.specs import timestamp
from shoal.v1 import task_pb2

__all__ = [
    "CLOSED",
    "HALF_OPEN",
    "OPEN",
    "Breaker",
    "Breakers",
    "backend_key",
    "executor_key",
    "node_key",
]

CLOSED = task_pb2.BREAKER_STATE_CLOSED
OPEN = task_pb2.BREAKER_STATE_OPEN
HALF_OPEN = task_pb2.BREAKER_STATE_HALF_OPEN


@dataclass(eq=False)
class Breaker:
    key: str
    state: int = CLOSED
    failures: int = 0  # consecutive infrastructure failures
    opened_at: float = 0.0  # wall clock
    retry_at: float = 0.0  # open: when it turns half-open (wall clock, shown)
    due: float = 0.0  # the same moment on the steady clock, which times it
    last_error: str = ""
    probe: str = ""  # half-open: the task sent as the probe, while it runs

    @property
    def passes(self) -> bool:
        """Whether a task may be dispatched to its key now (half-open: as the probe)."""
        return self.state == CLOSED or (self.state == HALF_OPEN and not self.probe)

    def proto(self) -> task_pb2.Breaker:
        out = task_pb2.Breaker(
            key=self.key,
            state=self.state,  # type: ignore[arg-type]
            failures=self.failures,
            last_error=self.last_error,
        )
        if self.state != CLOSED:
            out.opened_at.CopyFrom(timestamp(self.opened_at))
        if self.state == OPEN:
            out.retry_at.CopyFrom(timestamp(self.retry_at))
        return out


class Breakers:
    """Every breaker by key; each method returns the breakers whose state it changed."""

    def __init__(
        self,
        *,
        threshold: int,
        cooldown: float,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        """`clock` times cooldowns (a wall-clock step moves none); `wall` dates what is shown."""
        if threshold < 1:
            raise ValueError("breaker threshold must be at least 1")
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self._wall = wall
        self._all: dict[str, Breaker] = {}
        self.tripped = 0  # breakers not closed: when 0, dispatch skips every check

    def __bool__(self) -> bool:
        """Whether any breaker has failures (or is not closed)."""
        return bool(self._all)

    def get(self, key: str) -> Breaker | None:
        return self._all.get(key)

    def passes(self, key: str) -> bool:
        b = self._all.get(key)
        return b is None or b.passes

    def with_prefix(self, prefix: str) -> list[Breaker]:
        return [b for k, b in self._all.items() if k.startswith(prefix)]

    def failed(self, keys: Iterable[str], task_id: str, error: str) -> list[Breaker]:
        """An infrastructure failure of a task dispatched under `keys`."""
        changed = []
        for key in keys:
            b = self._all.get(key)
            if b is None:
                b = self._all[key] = Breaker(key)
            b.failures += 1
            b.last_error = error[:500]
            if (b.state == CLOSED and b.failures >= self.threshold) or (
                b.state == HALF_OPEN and b.probe == task_id
            ):
                self._open(b)
                changed.append(b)
        return changed

    def succeeded(self, keys: Iterable[str], task_id: str) -> list[Breaker]:
        """A task dispatched under `keys` ended without an infrastructure failure."""
        changed = []
        for key in keys:
            b = self._all.get(key)
            if b is None:
                continue
            if b.state == CLOSED:
                del self._all[key]  # a closed breaker with no failures is no breaker
            elif b.state == HALF_OPEN and b.probe == task_id:
                b.state, b.failures, b.probe, b.last_error = CLOSED, 0, "", ""
                self.tripped -= 1
                del self._all[key]
                changed.append(b)
        return changed

    def abandoned(self, keys: Iterable[str], task_id: str) -> list[Breaker]:
        """A task ended with no verdict on its keys (cancelled): a probe may go again."""
        changed = []
        for key in keys:
            b = self._all.get(key)
            if b is not None and b.state == HALF_OPEN and b.probe == task_id:
                b.probe = ""
                changed.append(b)
        return changed

    def half_open(self, key: str) -> Breaker | None:
        """The cooldown of an open breaker ended: it lets one probe through."""
        b = self._all.get(key)
        if b is None or b.state != OPEN or b.due > self._clock():
            return None
        b.state = HALF_OPEN
        return b

    def probing(self, keys: Iterable[str], task_id: str) -> list[Breaker]:
        """`task_id` is dispatched under `keys`: the probe of each of them that is half-open."""
        changed = []
        for key in keys:
            b = self._all.get(key)
            if b is not None and b.state == HALF_OPEN and not b.probe:
                b.probe = task_id
                changed.append(b)
        return changed

    def _open(self, b: Breaker) -> None:
        if b.state == CLOSED:
            self.tripped += 1
        now = self._wall()
        b.state, b.probe = OPEN, ""
        b.opened_at = now
        b.retry_at = now + self.cooldown
        b.due = self._clock() + self.cooldown
