"""Routing strategies: which of the nodes that can take a task now gets it.

Among the fitting nodes with room now, the nodes with the highest preferred-label score are
kept (score: the sum of the weights of the task's preferred labels the node carries; a
preference with an empty value matches any value of its key), then the strategy picks one:
`least_loaded` (lowest share of slots in use; ties: node id order), `round_robin` (the next
node after the one this class used last, in node id order), `random`, `weighted` (random in
proportion to node weight), `affinity` (the node that last ran the task's affinity key if it
has room, regardless of preference; otherwise `least_loaded`). Hard affinity makes the key part
of the class: its tasks wait for the remembered node, or go anywhere while the key has no
node. The key-to-node map is a bounded LRU: a forgotten key counts as never run.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from shoal.coordinator.placement.model import NodeSlots, Preference, Requirements, Routing

__all__ = [
    "ROUTERS",
    "AffinityMap",
    "AffinityRouter",
    "LeastLoadedRouter",
    "RandomRouter",
    "RoundRobinRouter",
    "RouteState",
    "Router",
    "WeightedRouter",
    "most_preferred",
]


class AffinityMap:
    """The node that last ran each affinity key; bounded: least recently used keys go first."""

    def __init__(self, capacity: int = 100_000) -> None:
        if capacity < 1:
            raise ValueError("an affinity map holds at least one key")
        self.capacity = capacity
        self._nodes: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, key: str) -> str | None:
        """The node of `key`, without touching its recency."""
        return self._nodes.get(key)

    def remember(self, key: str, node_id: str) -> tuple[bool, str | None]:
        """Record that `node_id` ran `key`: (whether its node changed, the key forgotten)."""
        before = self._nodes.get(key)
        self._nodes[key] = node_id
        self._nodes.move_to_end(key)
        evicted = None
        if len(self._nodes) > self.capacity:
            evicted, _ = self._nodes.popitem(last=False)
        return before != node_id, evicted


@dataclass(slots=True)
class RouteState:
    """What a strategy may keep per placement class."""

    last: str = ""  # round robin: the node id chosen last


def most_preferred(
    candidates: Sequence[NodeSlots], preferred: Sequence[Preference]
) -> Sequence[NodeSlots]:
    """The candidates with the highest preference score (all of them without preferences)."""
    if not preferred:
        return candidates
    scored = [(sum(p.weight for p in preferred if p.matches(n.labels)), n) for n in candidates]
    best = max(s for s, _ in scored)
    return [n for s, n in scored if s == best]


class Router(ABC):
    """A routing strategy: picks a task's node among those that can take it now."""

    name: ClassVar[Routing]

    def __init__(self, rng: random.Random, affinity: AffinityMap) -> None:
        self.rng = rng
        self.affinity = affinity

    def choose(
        self, candidates: Sequence[NodeSlots], req: Requirements, state: RouteState
    ) -> NodeSlots:
        """One of `candidates` (non-empty, in node id order): one with the task's model loaded
        in memory if any (no load time), most preferred, then `pick`."""
        if model := req.cls.model:
            loaded = [n for n in candidates if model in n.loaded_models]
            candidates = loaded or candidates
        if req.preferred:
            candidates = most_preferred(candidates, req.preferred)
        return self.pick(candidates, req, state)

    @abstractmethod
    def pick(self, nodes: Sequence[NodeSlots], req: Requirements, state: RouteState) -> NodeSlots:
        """One of `nodes` (non-empty, in node id order)."""


ROUTERS: dict[Routing, type[Router]] = {}


def _register(cls: type[Router]) -> type[Router]:
    ROUTERS[cls.name] = cls
    return cls


def _least_loaded(nodes: Sequence[NodeSlots]) -> NodeSlots:
    return min(nodes, key=lambda n: n.running / n.slots if n.slots > 0 else 1.0)


@_register
class LeastLoadedRouter(Router):
    name = Routing.LEAST_LOADED

    def pick(self, nodes: Sequence[NodeSlots], req: Requirements, state: RouteState) -> NodeSlots:
        return _least_loaded(nodes)


@_register
class RoundRobinRouter(Router):
    name = Routing.ROUND_ROBIN

    def pick(self, nodes: Sequence[NodeSlots], req: Requirements, state: RouteState) -> NodeSlots:
        node = next((n for n in nodes if n.node_id > state.last), nodes[0])
        state.last = node.node_id
        return node


@_register
class RandomRouter(Router):
    name = Routing.RANDOM

    def pick(self, nodes: Sequence[NodeSlots], req: Requirements, state: RouteState) -> NodeSlots:
        return self.rng.choice(nodes)


@_register
class WeightedRouter(Router):
    name = Routing.WEIGHTED

    def pick(self, nodes: Sequence[NodeSlots], req: Requirements, state: RouteState) -> NodeSlots:
        weights = [max(n.weight, 0.0) for n in nodes]
        if not sum(weights) > 0:
            return self.rng.choice(nodes)
        return self.rng.choices(nodes, weights)[0]


@_register
class AffinityRouter(Router):
    name = Routing.AFFINITY

    def choose(
        self, candidates: Sequence[NodeSlots], req: Requirements, state: RouteState
    ) -> NodeSlots:
        target = self.affinity.get(req.affinity_key) if req.affinity_key else None
        for n in candidates:
            if n.node_id == target:
                return n
        return super().choose(candidates, req, state)

    def pick(self, nodes: Sequence[NodeSlots], req: Requirements, state: RouteState) -> NodeSlots:
        return _least_loaded(nodes)
