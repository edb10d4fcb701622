"""The ready queue: lanes per (placement class, priority level, tenant), fair between tenants.

Queue. Tasks wait in lanes, one FIFO per (class, priority level, tenant). Each level keeps one
heap of the lanes that can run, keyed by their head's (fair tag, seq); the next task is the
top of the first non-empty level, so a dispatch costs O(log lanes) whatever the queue holds.

Fairness. Levels are strict (1 critical .. 5 background). Within a level, tenants share by
weight through virtual time (weighted fair queueing): a task pushed by tenant T gets the tag
max(T's previous tag, the level's virtual time) + 1 / weight(T), and the level's virtual time
is the largest tag dispatched. Tags grow with a tenant's own backlog, so a flood only delays
its own tenant; a tenant that was idle starts at the current virtual time, with no credit.

Never blocked at the head. A class whose fitting nodes have no room for its request is parked:
its lanes leave the heaps until the scheduler unparks it (a fitting node frees room, changes or
joins). So a task nobody can place never delays another class, and parked classes cost nothing
per dispatch.

Priority floors. A node that takes a level takes every higher one, so a task of a class that
cannot be placed at level L means none of that class can at L or below: the class is parked
from level L down, and its higher lanes go on.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from itertools import count

from shoal.coordinator.placement.model import (
    PRIORITY_LEVELS,
    NodeSlots,
    PlacementClass,
    Queued,
    level_of,
)
from shoal.coordinator.placement.routing import RouteState

__all__ = ["Place", "QueuedClass", "ReadyQueue"]


class _Lane:
    """The FIFO of one (class, level, tenant); `gen` names its one live heap entry."""

    __slots__ = ("cls", "gen", "in_heap", "items", "level", "tenant")

    def __init__(self, cls: QueuedClass, level: int, tenant: str) -> None:
        self.cls = cls
        self.level = level
        self.tenant = tenant
        self.items: deque[Queued] = deque()  # in tag order
        self.gen = 0
        self.in_heap = False


class QueuedClass:
    """A placement class in the queue: its lanes and parking (the queue's), and the fitting
    nodes and routing state the scheduler caches on it (`nodes`, `node_ids`, `version`,
    `offered`, `route`)."""

    __slots__ = (
        "key",
        "lanes",
        "node_ids",
        "nodes",
        "offered",
        "parked_from",
        "route",
        "slots_only",
        "version",
    )

    def __init__(self, key: PlacementClass) -> None:
        self.key = key
        r = key.resources
        self.slots_only = not (r.cpu_milli or r.memory_mb or r.gpus)  # the common, cheap case
        self.lanes: dict[tuple[int, str], _Lane] = {}
        self.parked_from = PRIORITY_LEVELS  # its lanes of this level and lower are parked
        self.nodes: list[NodeSlots] = []
        self.node_ids: frozenset[str] = frozenset()
        self.version = -1  # of the node set `nodes` was computed for
        self.route = RouteState()
        # Some node could run it, were its breaker closed (as of `version`): else, while
        # parked, it is reported in ReadyQueue.unoffered.
        self.offered = True


_Entry = tuple[float, int, int, _Lane]  # (head tag, head seq, lane gen, lane)

Place = Callable[[QueuedClass, Queued, int], NodeSlots | None]
"""Places the head task of a class at a level: its node (which now holds the task's request),
or None when no fitting node that takes that level has room."""


class ReadyQueue:
    """Ready tasks in lanes per (placement class, priority, tenant), fair between tenants.

    `len()` counts tasks still to dispatch; a task that leaves it otherwise (cancelled) is
    `remove`d, and its entry dropped when it reaches the head of its lane. `dispatch(place)`
    takes tasks out best first; the scheduler parks and unparks classes with `park`/`unpark`.
    """

    def __init__(
        self, tenant_weights: Mapping[str, float] | None = None, *, idle_classes: int = 1024
    ) -> None:
        self._weights: dict[str, float] = {}
        for tenant, weight in (tenant_weights or {}).items():
            self.set_weight(tenant, weight)
        self._classes: dict[PlacementClass, QueuedClass] = {}
        self._idle: OrderedDict[PlacementClass, QueuedClass] = OrderedDict()  # kept for their state
        self._idle_cap = idle_classes
        self._heaps: list[list[_Entry]] = [[] for _ in range(PRIORITY_LEVELS)]
        self._vtime = [0.0] * PRIORITY_LEVELS
        self._last: list[dict[str, float]] = [{} for _ in range(PRIORITY_LEVELS)]
        self._prune_at = [1024] * PRIORITY_LEVELS
        self._blocked: dict[QueuedClass, None] = {}  # parked classes, in parking order
        self._gen = count(1)
        self._size = 0
        self._woken = PRIORITY_LEVELS  # the lowest level a class was unparked into
        # Classes found with queued tasks and no node that could ever run them (not waiting
        # for one), since the caller last took them: see take_unoffered.
        self.unoffered: dict[PlacementClass, None] = {}

    def __len__(self) -> int:
        return self._size

    def set_weight(self, tenant: str, weight: float) -> None:
        """A tenant's share within a level (default 1); applies to tasks pushed from now on."""
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"tenant {tenant!r}: weight must be positive, not {weight}")
        self._weights[tenant] = weight

    def push(self, task: Queued) -> None:
        """Queue a task behind its tenant's earlier tasks of the same priority."""
        level = level_of(task.priority)
        tenant = task.tenant
        last = self._last[level]
        tag = max(last.get(tenant, 0.0), self._vtime[level]) + 1.0 / self._weights.get(tenant, 1.0)
        last[tenant] = tag
        if len(last) > self._prune_at[level]:
            self._prune(level)
        lane = self._lane(task, level)
        task.tag = tag
        lane.items.append(task)
        self._size += 1
        if not lane.in_heap:
            if level < lane.cls.parked_from:
                self._enter(lane)
            elif not lane.cls.offered:
                self._unoffered(lane.cls)

    def push_front(self, task: Queued) -> None:
        """Put back a task that was dispatched before: ahead of its tenant's queued tasks."""
        level = level_of(task.priority)
        lane = self._lane(task, level)
        tag = self._vtime[level]
        if lane.items:
            tag = min(tag, lane.items[0].tag)
        task.tag = tag
        lane.items.appendleft(task)
        self._size += 1
        if level < lane.cls.parked_from:
            self._enter(lane)  # its head changed: a new entry; the old one goes stale
        elif not lane.cls.offered:
            self._unoffered(lane.cls)

    def remove(self, task: Queued) -> None:
        """`task`, queued, leaves without being dispatched (cancelled, timed out, skipped): it
        counts no more at once, and its entry goes when it reaches the head of its lane (it
        no longer says `queued` by then)."""
        self._size -= 1

    def _lane(self, task: Queued, level: int) -> _Lane:
        key = task.placement.cls
        cls = self._classes.get(key)
        if cls is None:
            cls = self._idle.pop(key, None) or QueuedClass(key)
            self._classes[key] = cls
        lane = cls.lanes.get((level, task.tenant))
        if lane is None:
            lane = cls.lanes[level, task.tenant] = _Lane(cls, level, task.tenant)
        return lane

    def _enter(self, lane: _Lane) -> None:
        task = lane.items[0]
        lane.gen = next(self._gen)
        lane.in_heap = True
        heapq.heappush(self._heaps[lane.level], (task.tag, task.seq, lane.gen, lane))

    def _prune(self, level: int) -> None:
        """Forget tenants' tags the virtual time has passed: they start from it anyway."""
        vtime = self._vtime[level]
        last = self._last[level] = {t: v for t, v in self._last[level].items() if v > vtime}
        self._prune_at[level] = max(1024, 2 * len(last))

    def park(self, cls: QueuedClass, level: int) -> None:
        """No task of `cls` can be placed at `level`: nor at any lower level."""
        cls.parked_from = min(cls.parked_from, level)
        self._blocked[cls] = None
        if not cls.offered:
            self._unoffered(cls)

    def _unoffered(self, cls: QueuedClass) -> None:
        if not cls.key.wait:
            self.unoffered[cls.key] = None

    def unpark(self, cls: QueuedClass) -> None:
        """`cls` may be placed again at every level: its lanes go back into the heaps."""
        cls.parked_from = PRIORITY_LEVELS
        self._blocked.pop(cls, None)
        for lane in cls.lanes.values():
            if not lane.in_heap and lane.items:
                self._enter(lane)
                self._woken = min(self._woken, lane.level)

    def _drop_lane(self, lane: _Lane) -> None:
        """An emptied lane goes; an emptied class is kept idle a while for its routing state."""
        cls = lane.cls
        del cls.lanes[lane.level, lane.tenant]
        if not cls.lanes:
            del self._classes[cls.key]
            self._idle[cls.key] = cls
            if len(self._idle) > self._idle_cap:
                self._idle.popitem(last=False)

    def depths(self) -> Counter[tuple[int, str]]:
        """Queued tasks by (priority 1..5, tenant), in one pass over the lanes (not the tasks);
        a task cancelled in the queue counts until its lane's head passes it."""
        found: Counter[tuple[int, str]] = Counter()
        for cls in self._classes.values():
            for lane in cls.lanes.values():
                if lane.items:
                    found[lane.level + 1, lane.tenant] += len(lane.items)
        return found

    def classes(self) -> Iterable[PlacementClass]:
        """The classes with queued tasks (or cancelled ones not yet dropped)."""
        return self._classes.keys()

    # -- what the scheduler asks of the queue --------------------------------------------------

    def state(self, key: PlacementClass) -> QueuedClass | None:
        """The class `key` while it has lanes (queued tasks, or cancelled ones not yet dropped)."""
        return self._classes.get(key)

    def parked(self) -> list[QueuedClass]:
        """The parked classes, in parking order (a copy: unparking them is safe)."""
        return list(self._blocked)

    def unpark_all(self) -> None:
        """Every parked class checks again at its next turn (the node set changed)."""
        for cls in list(self._blocked):
            self.unpark(cls)

    def take_unoffered(self) -> list[PlacementClass]:
        """The classes found since the last call with queued tasks no connected node could
        ever run (breakers aside), except those that wait for such a node."""
        found = list(self.unoffered)
        self.unoffered.clear()
        return found

    def take_expired(
        self, key: PlacementClass, expired: Callable[[Queued], bool]
    ) -> tuple[list[Queued], list[Queued]]:
        """Take the tasks of class `key` that are `expired` from the front of each of its lanes
        (up to the first that is not): (those taken, the heads of the lanes left). The caller
        makes each taken task final; one cancelled before is dropped on the way."""
        cls = self._classes.get(key)
        if cls is None:
            return [], []
        taken: list[Queued] = []
        heads: list[Queued] = []
        for lane in list(cls.lanes.values()):
            items = lane.items
            before = len(items)
            while items and (not items[0].queued or expired(items[0])):
                task = items.popleft()
                if task.queued:
                    taken.append(task)
            if items:
                heads.append(items[0])
                if lane.in_heap and len(items) != before:
                    self._enter(lane)  # its head changed: a new entry; the old one goes stale
            else:
                if lane.in_heap:
                    lane.gen = next(self._gen)  # its entry goes stale
                    lane.in_heap = False
                self._drop_lane(lane)
        return taken, heads

    def dispatch(self, place: Place) -> list[tuple[Queued, NodeSlots]]:
        """Take ready tasks out while `place` finds them a node, best first."""
        out: list[tuple[Queued, NodeSlots]] = []
        if not self._size:  # (with no node each class is parked at once: none can run it)
            return out
        level = 0
        while level < PRIORITY_LEVELS:
            self._woken = PRIORITY_LEVELS
            self._drain(level, place, out)
            # Placing can wake a hard-affinity class (its key moved): it gets its turn now.
            level = min(level + 1, self._woken)
        return out

    def _drain(self, level: int, place: Place, out: list[tuple[Queued, NodeSlots]]) -> None:
        """Dispatch from one level until each of its lanes is empty or its class parked."""
        heap = self._heaps[level]
        heappop, heappush, heapreplace = heapq.heappop, heapq.heappush, heapq.heapreplace
        vtime = self._vtime[level]
        while heap:
            _, _, gen, lane = heap[0]
            if gen != lane.gen:  # superseded by a newer entry of its lane
                heappop(heap)
                continue
            cls = lane.cls
            if level >= cls.parked_from:
                heappop(heap)
                lane.in_heap = False
                continue
            items = lane.items
            task = items[0]
            tag = task.tag
            if not task.queued:  # cancelled while queued: already removed
                items.popleft()
                if items:
                    lane.gen = next(self._gen)
                    task = items[0]
                    heapreplace(heap, (task.tag, task.seq, lane.gen, lane))
                else:
                    heappop(heap)
                    lane.in_heap = False
                    self._drop_lane(lane)
                continue
            heappop(heap)  # before placing: that may unpark classes into this heap
            node = place(cls, task, level)
            if node is None:
                lane.in_heap = False
                self.park(cls, level)
                continue
            items.popleft()
            self._size -= 1
            out.append((task, node))
            if tag > vtime:
                vtime = self._vtime[level] = tag
            if items:
                lane.gen = next(self._gen)
                task = items[0]
                heappush(heap, (task.tag, task.seq, lane.gen, lane))
            else:
                lane.in_heap = False
                self._drop_lane(lane)
