"""Placement: the ready queue and the choice of node for each task.

Tasks are grouped by placement class (executor + required labels). Each class keeps one
FIFO per priority, so picking the next task costs O(classes x priorities), never O(queue),
and a task nobody can place never blocks the classes behind it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["NodeSlots", "PlacementClass", "Queued", "ReadyQueue", "Scheduler"]

PRIORITY_LEVELS = 5


@dataclass(frozen=True, slots=True)
class PlacementClass:
    """What a node must offer to run a task."""

    executor: str
    labels: frozenset[tuple[str, str]]

    def fits(self, executors: frozenset[str], labels: Mapping[str, str]) -> bool:
        return self.executor in executors and all(labels.get(k) == v for k, v in self.labels)


class Queued(Protocol):
    """What the scheduler needs of a task."""

    @property
    def seq(self) -> int: ...

    @property
    def priority(self) -> int: ...  # 1 (critical) .. 5 (background)

    @property
    def placement(self) -> PlacementClass: ...

    @property
    def queued(self) -> bool: ...  # False once cancelled while in the queue


@dataclass(eq=False)
class NodeSlots:
    """A node as placement sees it."""

    node_id: str
    executors: frozenset[str]
    labels: Mapping[str, str]
    slots: int
    running: int = 0
    accepting: bool = True

    @property
    def free(self) -> int:
        return self.slots - self.running if self.accepting else 0


@dataclass
class _ClassQueue:
    placement: PlacementClass
    levels: list[deque[Queued]] = field(
        default_factory=lambda: [deque() for _ in range(PRIORITY_LEVELS)]
    )

    def head(self) -> Queued | None:
        for level in self.levels:
            while level and not level[0].queued:
                level.popleft()
            if level:
                return level[0]
        return None


class ReadyQueue:
    """Ready tasks by placement class and priority; FIFO by arrival within a priority."""

    def __init__(self) -> None:
        self._classes: dict[PlacementClass, _ClassQueue] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def _queue(self, task: Queued) -> deque[Queued]:
        cq = self._classes.get(task.placement)
        if cq is None:
            cq = self._classes[task.placement] = _ClassQueue(task.placement)
        return cq.levels[task.priority - 1]

    def push(self, task: Queued) -> None:
        self._queue(task).append(task)
        self._size += 1

    def push_front(self, task: Queued) -> None:
        """Put back a task that was dispatched before (it keeps its place ahead of newer ones)."""
        self._queue(task).appendleft(task)
        self._size += 1

    def discard(self) -> None:
        """Account for a queued task that left the queue without being popped (cancelled)."""
        self._size -= 1

    def classes(self) -> Iterable[_ClassQueue]:
        return self._classes.values()

    def pop(self, cq: _ClassQueue) -> Queued:
        for level in cq.levels:
            if level:
                self._size -= 1
                return level.popleft()
        raise IndexError("pop from an empty class queue")


class Scheduler:
    """Matches ready tasks to nodes with free slots: highest priority first, least loaded node."""

    def __init__(self) -> None:
        self.queue = ReadyQueue()
        self.nodes: dict[str, NodeSlots] = {}

    def add_node(self, node: NodeSlots) -> None:
        self.nodes[node.node_id] = node

    def remove_node(self, node_id: str) -> None:
        self.nodes.pop(node_id, None)

    def offered(self, placement: PlacementClass) -> bool:
        """Whether any connected node could ever run this class."""
        return any(placement.fits(n.executors, n.labels) for n in self.nodes.values())

    def schedule(self) -> list[tuple[Queued, NodeSlots]]:
        """Assign as many ready tasks as free slots allow; never more than a node's free slots."""
        free = [n for n in self.nodes.values() if n.free > 0]
        if not free or not len(self.queue):
            return []
        candidates: list[tuple[_ClassQueue, list[NodeSlots]]] = []
        for cq in self.queue.classes():
            fitting = [n for n in free if cq.placement.fits(n.executors, n.labels)]
            if fitting:
                candidates.append((cq, fitting))
        out: list[tuple[Queued, NodeSlots]] = []
        while candidates:
            best: tuple[int, int] | None = None
            pick: tuple[_ClassQueue, list[NodeSlots]] | None = None
            for cq, fitting in candidates:
                head = cq.head()
                if head is None:
                    continue
                rank = (head.priority, head.seq)
                if best is None or rank < best:
                    best, pick = rank, (cq, fitting)
            if pick is None:
                break
            cq, fitting = pick
            node = min(fitting, key=lambda n: n.running / n.slots)
            task = self.queue.pop(cq)
            node.running += 1
            out.append((task, node))
            if node.free <= 0:
                for _, nodes in candidates:
                    if node in nodes:
                        nodes.remove(node)
                candidates = [(c, ns) for c, ns in candidates if ns]
        return out
