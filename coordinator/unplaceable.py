"""Tasks no connected node could ever run: they fail after a grace, unless they wait for a node.

A class of tasks (a PlacementClass) is unplaceable while none of the connected nodes has what
it asks for: executor, labels, model, tool, provider or resources in all (room aside; an open
breaker aside). The book follows such classes, not their tasks: one timer per class, and at
each the tasks whose grace is over (counted from their submission or from when the class
became unplaceable, whichever is later) are taken from the fronts of the class's lanes. So
nothing here costs per queued task, and nothing at all while every class has a node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import count

from shoal.coordinator.placement import PlacementClass, Queued, Scheduler

__all__ = ["Sweep", "UnplaceableBook"]


@dataclass(frozen=True, slots=True)
class Sweep:
    """What one timer found: tasks to fail and why, and when to look again (None: never)."""

    expired: list[Queued]
    reason: str
    again_at: float | None


def _none(reason: str) -> str:
    """`none offers tool 'x'` for `no node offers tool 'x'`: it follows "no connected node
    can run it: "."""
    for prefix in ("no connected node ", "no node "):
        if reason.startswith(prefix):
            return "none " + reason.removeprefix(prefix)
    return reason


def _created_at(task: Queued) -> float:
    """When `task` was submitted: the core's tasks (TaskRecord) say; others count as new."""
    return float(getattr(task, "created_at", math.inf))


class UnplaceableBook:
    """The unplaceable classes the core follows, by timer key; times are wall seconds.

    `grace`: how long a task waits for a node that can run it; none fails before `hold_until`
    (after a restart, the nodes that were connected get their restart grace to return).
    """

    def __init__(self, scheduler: Scheduler, *, grace: float, hold_until: float = 0.0) -> None:
        self._scheduler = scheduler
        self.grace = grace
        self.hold_until = hold_until
        self._classes: dict[str, tuple[PlacementClass, float]] = {}  # timer key: (class, since)
        self._keys: dict[PlacementClass, str] = {}
        self._ids = count(1)

    def __len__(self) -> int:
        return len(self._classes)

    def found(self, now: float) -> list[tuple[str, float]]:
        """Follow the classes the scheduler found unplaceable: (timer key, due) for each new."""
        out = []
        for key in self._scheduler.take_unoffered():
            if key in self._keys:
                continue
            timer = str(next(self._ids))
            self._classes[timer] = (key, now)
            self._keys[key] = timer
            out.append((timer, max(now + self.grace, self.hold_until)))
        return out

    def hold(self, until: float) -> None:
        """No task fails before `until` (a node left: it may be back soon)."""
        self.hold_until = max(self.hold_until, until)

    def fails_at(self, key: PlacementClass, created_at: float) -> float | None:
        """When a task of class `key` submitted at `created_at` fails, if its class is followed."""
        timer = self._keys.get(key)
        if timer is None:
            return None
        return max(max(created_at, self._classes[timer][1]) + self.grace, self.hold_until)

    def sweep(self, timer: str, now: float) -> Sweep:
        """The tasks of a followed class whose grace is over, taken from the queue (the caller
        fails them); the class is no longer followed once a node can run it or it is empty."""
        entry = self._classes.get(timer)
        if entry is None:
            return Sweep([], "", None)
        key, since = entry
        if not self._scheduler.unoffered(key):
            self._forget(timer)
            return Sweep([], "", None)
        if now < self.hold_until:
            return Sweep([], "", self.hold_until)
        grace = self.grace
        expired, heads = self._scheduler.take_expired(
            key, lambda t: max(_created_at(t), since) + grace <= now
        )
        reason = _none(self._scheduler.explain(expired[0])) if expired else ""
        if not heads:
            self._forget(timer)
            return Sweep(expired, reason, None)
        again = min(max(_created_at(t), since) for t in heads) + grace
        return Sweep(expired, reason, max(again, now))

    def _forget(self, timer: str) -> None:
        key, _ = self._classes.pop(timer)
        del self._keys[key]
