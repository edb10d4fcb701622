"""The scheduler: matches ready tasks to nodes over the ready queue and a ledger of resources.

A dispatch takes the task's request from its node; `release` gives it back; the scheduler
never assigns beyond capacity. No resources are held back for a parked class: a large request
can wait while smaller ones keep a node busy.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping

from shoal.coordinator.placement.model import (
    PRIORITY_LEVELS,
    NodeSlots,
    PlacementClass,
    Queued,
    Routing,
    level_of,
)
from shoal.coordinator.placement.pending import explain
from shoal.coordinator.placement.ready_queue import QueuedClass, ReadyQueue
from shoal.coordinator.placement.routing import ROUTERS, AffinityMap

__all__ = ["Scheduler"]


class Scheduler:
    """Matches ready tasks to nodes: strict priority, fair tenants, exact resource ledger.

    `schedule()` assigns what fits now and takes each task's resources from its node; the
    caller gives them back with `release()` when the task ends, and tells of node changes with
    `add_node`, `remove_node` and `set_accepting`. Nothing here blocks or does I/O.
    """

    def __init__(
        self,
        *,
        tenant_weights: Mapping[str, float] | None = None,
        routing: Routing = Routing.LEAST_LOADED,
        rng: random.Random | None = None,
        affinity_keys: int = 100_000,
        idle_classes: int = 1024,
    ) -> None:
        self.queue = ReadyQueue(tenant_weights, idle_classes=idle_classes)
        self.nodes: dict[str, NodeSlots] = {}
        self.routing = routing
        self.affinity = AffinityMap(affinity_keys)
        rng = rng if rng is not None else random.Random()
        self._routers = {name: cls(rng, self.affinity) for name, cls in ROUTERS.items()}
        self._version = 0  # of the node set: classes recompute their fitting nodes when it moves

    # -- nodes -------------------------------------------------------------------------------

    def add_node(self, node: NodeSlots) -> None:
        """A node joined, or came back changed (it replaces the one with its id)."""
        self.nodes[node.node_id] = node
        self._version += 1
        self.queue.unpark_all()

    def remove_node(self, node_id: str) -> None:
        if self.nodes.pop(node_id, None) is not None:
            self._version += 1
            self.queue.unpark_all()  # each checks again whether any node can run it

    def set_accepting(self, node_id: str, accepting: bool, because: str = "draining") -> None:
        """Close a node to new work (saying why) or open it again; it keeps what it runs."""
        node = self.nodes.get(node_id)
        if node is not None:
            node.accepting = accepting
            node.closed_because = "" if accepting else because
            if accepting:
                self._wake(node)

    def set_min_priority(self, node_id: str, priority: int = 0, because: str = "") -> None:
        """The lowest priority a node takes now (1 critical .. 5 background; 0: every one), and
        why it takes no lower; it keeps what it runs."""
        node = self.nodes.get(node_id)
        if node is None:
            return
        level = level_of(priority) if priority else PRIORITY_LEVELS - 1
        node.limited_because = because if level < PRIORITY_LEVELS - 1 else ""
        if level != node.max_level:
            raised = level > node.max_level
            node.max_level = level
            if raised:
                self._wake(node)

    def set_tripped(self, node_id: str, executors: frozenset[str]) -> None:
        """The executors of a node that take no work now (their circuit breakers are open)."""
        node = self.nodes.get(node_id)
        if node is not None and node.tripped != executors:
            node.tripped = executors
            self._version += 1  # which nodes fit a class changed
            self.queue.unpark_all()

    def release(self, node: NodeSlots, task: Queued) -> None:
        """Give back what `task` held on `node` (its run ended); classes it can now take wake."""
        node.give(task.placement.cls.resources)
        if self.nodes.get(node.node_id) is node:
            self._wake(node)

    def _wake(self, node: NodeSlots) -> None:
        for cls in self.queue.parked():
            if cls.version != self._version or (
                node.node_id in cls.node_ids
                and node.max_level >= cls.parked_from
                and node.has_room(cls.key.resources)
                and self._target_allows(cls.key, node.node_id)
            ):
                self.queue.unpark(cls)

    def _target_allows(self, key: PlacementClass, node_id: str) -> bool:
        if not key.affinity_key:
            return True
        target = self.affinity.get(key.affinity_key)
        return target is None or target == node_id

    def _fitting(self, cls: QueuedClass) -> list[NodeSlots]:
        if cls.version != self._version:
            key = cls.key
            cls.nodes = sorted(
                (n for n in self.nodes.values() if key.fits(n)), key=lambda n: n.node_id
            )
            cls.node_ids = frozenset(n.node_id for n in cls.nodes)
            cls.offered = bool(cls.nodes) or any(key.capable(n) for n in self.nodes.values())
            cls.version = self._version
        return cls.nodes

    def offered(self, placement: PlacementClass) -> bool:
        """Whether any connected node could ever run this class (room aside)."""
        return any(placement.fits(n) for n in self.nodes.values())

    # -- tasks no node can run ---------------------------------------------------------------

    def take_unoffered(self) -> list[PlacementClass]:
        """The classes found since the last call with queued tasks no connected node could
        ever run (breakers aside), except those that wait for such a node."""
        return self.queue.take_unoffered()

    def unoffered(self, key: PlacementClass) -> bool:
        """Whether `key` has queued tasks and still no connected node could ever run them."""
        cls = self.queue.state(key)
        if cls is None or not cls.lanes:
            return False
        self._fitting(cls)
        return not cls.offered

    def take_expired(
        self, key: PlacementClass, expired: Callable[[Queued], bool]
    ) -> tuple[list[Queued], list[Queued]]:
        """Take the tasks of class `key` that are `expired` from the front of each of its lanes
        (up to the first that is not): (those taken, the heads of the lanes left). The caller
        makes each taken task final; one cancelled before is dropped on the way."""
        return self.queue.take_expired(key, expired)

    # -- dispatch ----------------------------------------------------------------------------

    def schedule(self) -> list[tuple[Queued, NodeSlots]]:
        """Assign ready tasks while they fit, best first; each takes its request from its node."""
        return self.queue.dispatch(self._place)

    def _place(self, cls: QueuedClass, task: Queued, level: int) -> NodeSlots | None:
        """The node for `task`, the next of `cls` at `level`, holding its request now; or None
        when no fitting node that takes that level has room."""
        req = task.placement
        nodes = self._fitting(cls)
        res = cls.key.resources
        key = cls.key.affinity_key
        if key:  # hard affinity: only the key's node, once it has one
            target = self.affinity.get(key)
            if target is not None:
                node = self.nodes.get(target)
                if (
                    node is None
                    or target not in cls.node_ids
                    or node.max_level < level
                    or not node.has_room(res)
                ):
                    return None
                self._remember(key, node.node_id)
                node.take(res)
                return node
        if cls.slots_only:
            need = res.slots
            candidates = [
                n
                for n in nodes
                if n.accepting and n.max_level >= level and n.slots - n.running >= need
            ]
        else:
            candidates = [n for n in nodes if n.max_level >= level and n.has_room(res)]
        if not candidates:
            return None
        routing = req.routing or self.routing
        node = self._routers[routing].choose(candidates, req, cls.route)
        key = key or (req.affinity_key if routing is Routing.AFFINITY else "")
        if key:
            self._remember(key, node.node_id)
        node.take(res)
        return node

    def _remember(self, key: str, node_id: str) -> None:
        changed, evicted = self.affinity.remember(key, node_id)
        if changed or evicted:
            # A hard-affinity class of this key (or the forgotten one) now waits elsewhere.
            for cls in self.queue.parked():
                if cls.key.affinity_key and cls.key.affinity_key in (key, evicted):
                    self.queue.unpark(cls)

    def explain(self, task: Queued) -> str:
        """Why a queued task is not running: the first constraint no connected node meets."""
        return explain(task, self.nodes, self.affinity)
