"""Locks: named, exclusive or shared, held by tasks while they run or by leases from outside.

A task declares its locks (`file:/x` exclusive, `read:file:/x` shared) and takes all of them
at once when it is dispatched, or none and waits: no task ever holds one lock while waiting for
another, so there is no deadlock. A lease (the Locks API) holds a lock until it is released or
its time ends, and carries a fencing token that grows with every lease of the name.
Shared holders may join while a task waits for the exclusive lock (readers are not held back
behind a waiting writer).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from shoal.coordinator.admission import Admission, Refusal
from shoal.coordinator.records import TaskRecord
from shoal.errors import InvalidArgument
from shoal.v1 import task_pb2

__all__ = ["LockGate", "parse_locks"]

_SHARED = "read:"


def parse_locks(names: Iterable[str]) -> tuple[tuple[str, bool], ...]:
    """(name, shared) per declared lock; a name declared twice counts once, exclusive first."""
    wanted: dict[str, bool] = {}
    for declared in names:
        shared = declared.startswith(_SHARED)
        name = declared.removeprefix(_SHARED) if shared else declared
        if not name:
            raise InvalidArgument(f"lock {declared!r} names nothing")
        wanted[name] = wanted.get(name, True) and shared
    return tuple(sorted(wanted.items()))


@dataclass
class _Lock:
    exclusive: str = ""  # its holder (a task id or "lease:<token>")
    shared: set[str] = field(default_factory=set)

    def blocks(self, shared: bool) -> bool:
        return bool(self.exclusive) or (not shared and bool(self.shared))

    def holders(self) -> str:
        if self.exclusive:
            return f"{_who(self.exclusive)} (exclusive)"
        some = ", ".join(sorted(_who(h) for h in self.shared)[:3])
        return f"{len(self.shared)} shared holder(s): {some}"


def _who(holder: str) -> str:
    return holder.replace("lease:", "lease ") if holder.startswith("lease:") else f"task {holder}"


@dataclass
class LockGate(Admission):
    """Who holds which lock; a gate at dispatch for the tasks that declare locks."""

    _locks: dict[str, _Lock] = field(default_factory=dict)
    _held: dict[str, tuple[tuple[str, bool], ...]] = field(default_factory=dict)

    def keys(self, rec: TaskRecord) -> list[str]:
        return [f"lock:{name}" for name, _ in rec.locks]

    def conflict(self, wanted: tuple[tuple[str, bool], ...]) -> Refusal | None:
        for name, shared in wanted:
            lock = self._locks.get(name)
            if lock is not None and lock.blocks(shared):
                return Refusal(f"lock:{name}", f"lock {name} is held by {lock.holders()}")
        return None

    def hold(self, holder: str, wanted: tuple[tuple[str, bool], ...]) -> None:
        for name, shared in wanted:
            lock = self._locks.setdefault(name, _Lock())
            if shared:
                lock.shared.add(holder)
            else:
                lock.exclusive = holder
        self._held[holder] = wanted

    def release(self, holder: str) -> list[str]:
        """Let go of everything `holder` holds; returns the waiting keys it freed."""
        wanted = self._held.pop(holder, ())
        for name, shared in wanted:
            lock = self._locks[name]
            if shared:
                lock.shared.discard(holder)
            elif lock.exclusive == holder:
                lock.exclusive = ""
            if not lock.exclusive and not lock.shared:
                del self._locks[name]
        return [f"lock:{name}" for name, _ in wanted]

    def take(self, rec: TaskRecord, now: float) -> Refusal | None:
        if not rec.locks:
            return None
        refusal = self.conflict(rec.locks)
        if refusal is None:
            self.hold(rec.id, rec.locks)
        return refusal

    def give_back(
        self, rec: TaskRecord, result: task_pb2.TaskResult | None, now: float
    ) -> list[str]:
        return self.release(rec.id) if rec.locks else []

    def holding(self, name: str) -> bool:
        return name in self._locks
