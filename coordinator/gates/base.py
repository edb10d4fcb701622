"""Gates a task passes at dispatch besides placement: quotas and locks (and the holding
queues they share with backend circuit breakers).

Each gate takes what a task needs as it is dispatched, or refuses, naming the key the task
waits on and, when it can tell, when to look again. The coordinator holds a refused task
(PENDING, saying why) in a queue per key and wakes one at a time: when a task under that key
gives back what it took, when the named time comes, or when the one before it got through.
So a thousand tasks behind one lock cost one wake-up per release, not a thousand.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from shoal.coordinator.records import TaskRecord
from shoal.v1 import task_pb2

__all__ = ["Admission", "Refusal", "Waiting"]


@dataclass(frozen=True, slots=True)
class Refusal:
    key: str  # what the task waits on, e.g. "quota:provider:openai"
    reason: str  # for pending_reason: "rate limit provider:openai: next slot in 1.2 s"
    retry_at: float | None = None  # wall time to look again; None: when the key frees up
    retry_after: float | None = None  # or seconds from now to look again (e.g. a rate's slot)
    fail: bool = False  # fail the task now (fail-fast) instead of holding it


class Admission(ABC):
    """A gate: `take` at dispatch, `give_back` when the attempt ends (or never starts)."""

    @abstractmethod
    def take(self, rec: TaskRecord, now: float) -> Refusal | None:
        """Take what `rec` needs to run now, or say why it cannot (then nothing is taken)."""

    @abstractmethod
    def give_back(
        self, rec: TaskRecord, result: task_pb2.TaskResult | None, now: float
    ) -> Iterable[str]:
        """`rec`'s attempt ended (`result` None: it never ran). Returns the keys it freed."""

    @abstractmethod
    def keys(self, rec: TaskRecord) -> list[str]:
        """The waiting keys `rec` passed through, for waking whoever waits behind it."""


class Waiting:
    """The tasks held back per key, oldest first."""

    def __init__(self) -> None:
        self._queues: dict[str, deque[TaskRecord]] = {}

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def counts(self) -> dict[str, int]:
        """Tasks held per key (cancelled ones included until they reach the head)."""
        return {key: len(q) for key, q in self._queues.items()}

    def hold(self, key: str, rec: TaskRecord) -> None:
        self._queues.setdefault(key, deque()).append(rec)

    def has(self, key: str) -> bool:
        return key in self._queues

    def next(self, key: str) -> TaskRecord | None:
        """The oldest task waiting on `key` that still waits (cancelled ones are dropped)."""
        queue = self._queues.get(key)
        while queue:
            rec = queue.popleft()
            if rec.state == task_pb2.TASK_STATE_PENDING and rec.held_by == key:
                if not queue:
                    del self._queues[key]
                return rec
        self._queues.pop(key, None)
        return None
