"""Placement: the ready queue, the ledger of node resources and the choice of node per task.

What a task asks is its `Requirements`: a `PlacementClass` (everything that decides *which*
nodes can run it: executor, exact labels, selectors, model, resource request, hard affinity
key) and how to rank those nodes (routing strategy, preferred labels, soft affinity key).
Protobuf stays at the edge: `requirements_of(spec)` and `node_slots_of(info)` convert.

Queue. Tasks wait in lanes, one FIFO per (class, priority level, tenant). Each level keeps one
heap of the lanes that can run, keyed by their head's (fair tag, seq); the next task is the
top of the first non-empty level, so a dispatch costs O(log lanes) whatever the queue holds.

Fairness. Levels are strict (1 critical .. 5 background). Within a level, tenants share by
weight through virtual time (weighted fair queueing): a task pushed by tenant T gets the tag
max(T's previous tag, the level's virtual time) + 1 / weight(T), and the level's virtual time
is the largest tag dispatched. Tags grow with a tenant's own backlog, so a flood only delays
its own tenant; a tenant that was idle starts at the current virtual time, with no credit.

Never blocked at the head. A class whose fitting nodes have no room for its request is parked:
its lanes leave the heaps until a fitting node frees room, changes or joins
(`release`, `set_accepting`, `add_node`). So a task nobody can place never delays another
class, and parked classes cost nothing per dispatch. No resources are held back for a parked
class: a large request can wait while smaller ones keep a node busy.

Priority floors. A node may take only tasks down to some priority for a while (its machine is
busy: `set_min_priority`). A node that takes a level takes every higher one, so a task of a
class that cannot be placed at level L means none of that class can at L or below: the class
is parked from level L down, and its higher lanes go on.

Resources. A node's capacity is what it reports: slots, CPUs, memory, GPUs. Zero (or nothing
reported) means none: a node that reports no GPUs takes only tasks that request no GPUs. A
dispatch takes the task's request from its node; `release` gives it back; the scheduler never
assigns beyond capacity. CPU is counted in millicores so the ledger is exact.

Routing. Among the fitting nodes with room now, the nodes with the highest preferred-label
score are kept (score: the sum of the weights of the task's preferred labels the node carries;
a preference with an empty value matches any value of its key), then the strategy picks one:
`least_loaded` (lowest share of slots in use; ties: node id order), `round_robin` (the next
node after the one this class used last, in node id order), `random`, `weighted` (random in
proportion to node weight), `affinity` (the node that last ran the task's affinity key if it
has room, regardless of preference; otherwise `least_loaded`). Hard affinity makes the key part
of the class: its tasks wait for the remembered node, or go anywhere while the key has no
node. The key-to-node map is a bounded LRU: a forgotten key counts as never run.
"""

from __future__ import annotations

import heapq
import math
import random
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from enum import StrEnum
from itertools import count
from typing import Any, ClassVar, Protocol

from shoal.specs import executor_of
from shoal.v1 import node_pb2, task_pb2

__all__ = [
    "PRIORITY_LEVELS",
    "ROUTERS",
    "AffinityMap",
    "NodeSlots",
    "Op",
    "PlacementClass",
    "Preference",
    "Queued",
    "ReadyQueue",
    "Requirements",
    "Resources",
    "RouteState",
    "Router",
    "Routing",
    "Scheduler",
    "Selector",
    "fields_of",
    "most_preferred",
    "node_slots_of",
    "plain_key",
    "plain_requirements",
    "requirements_of",
]

PRIORITY_LEVELS = 5
_UNPLACEABLE = 1 << 62  # an infinite request: larger than any capacity


class Op(StrEnum):
    """How a selector tests one label."""

    IN = "in"
    NOT_IN = "not in"
    EXISTS = "exists"
    DOES_NOT_EXIST = "does not exist"


@dataclass(frozen=True, slots=True, order=True)
class Selector:
    """A condition on one node label; `values` sorted and unique (IN / NOT_IN only)."""

    key: str
    op: Op = Op.IN
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.op is Op.IN:
            return value is not None and value in self.values
        if self.op is Op.NOT_IN:
            return value is None or value not in self.values
        if self.op is Op.EXISTS:
            return value is not None
        return value is None

    def __str__(self) -> str:
        if self.op in (Op.IN, Op.NOT_IN):
            return f"{self.key} {self.op} ({', '.join(self.values)})"
        return f"{self.key} {self.op}"


@dataclass(frozen=True, slots=True)
class Resources:
    """An amount of each tracked resource: what a task occupies while it runs."""

    slots: int = 1
    cpu_milli: int = 0
    memory_mb: int = 0
    gpus: int = 0


_ONE_SLOT = Resources()


@dataclass(frozen=True, slots=True)
class PlacementClass:
    """Everything that decides which nodes can run a task; tasks of one class share lanes."""

    executor: str
    labels: frozenset[tuple[str, str]] = frozenset()
    selectors: tuple[Selector, ...] = ()
    model: str = ""
    resources: Resources = _ONE_SLOT
    affinity_key: str = ""  # set only with hard affinity
    tool: str = ""  # a tool task's tool, which the node must offer
    provider: str = ""  # a cloud LLM provider the node must have a key for
    wait: bool = False  # wait for a node that can run it, however long (wait_for_node)
    _hash: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        # Hashed at every push: computed once.
        fields = (self.executor, self.labels, self.selectors, self.model, self.tool, self.provider)
        object.__setattr__(
            self, "_hash", hash((*fields, self.resources, self.affinity_key, self.wait))
        )

    def __hash__(self) -> int:
        return self._hash

    def fits(self, node: NodeSlots) -> bool:
        """Whether the node could ever run this class: capabilities and total capacity."""
        return self.executor not in node.tripped and self.capable(node)

    def capable(self, node: NodeSlots) -> bool:
        """`fits`, whether or not the executor's circuit breaker is open on the node."""
        r = self.resources
        return (
            self.executor in node.executors
            and all(node.labels.get(k) == v for k, v in self.labels)
            and all(s.matches(node.labels) for s in self.selectors)
            and (not self.model or self.model in node.models)
            and (not self.tool or self.tool in node.tools)
            and (not self.provider or self.provider in node.providers)
            and r.slots <= node.slots
            and r.cpu_milli <= node.cpu_milli
            and r.memory_mb <= node.memory_mb
            and r.gpus <= node.gpus
        )


class Routing(StrEnum):
    """The routing strategies, by the names used in configuration."""

    LEAST_LOADED = "least_loaded"
    ROUND_ROBIN = "round_robin"
    RANDOM = "random"
    WEIGHTED = "weighted"
    AFFINITY = "affinity"


@dataclass(frozen=True, slots=True)
class Preference:
    """A label a node should preferably carry; an empty value matches any value of the key."""

    key: str
    value: str = ""
    weight: float = 1.0

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        return value is not None and (not self.value or value == self.value)


@dataclass(frozen=True, slots=True)
class Requirements:
    """What a task asks of its node: the class it queues in, and how to rank fitting nodes.

    `routing` None means the scheduler's default; `affinity_key` is used by `affinity` routing
    (and is also `cls.affinity_key` when the affinity is hard).
    """

    cls: PlacementClass
    routing: Routing | None = None
    preferred: tuple[Preference, ...] = ()
    affinity_key: str = ""


class Queued(Protocol):
    """What the scheduler needs of a task."""

    @property
    def seq(self) -> int: ...  # arrival order

    @property
    def priority(self) -> int: ...  # 1 (critical) .. 5 (background)

    @property
    def tenant(self) -> str: ...

    @property
    def placement(self) -> Requirements: ...

    @property
    def queued(self) -> bool: ...  # False once cancelled while in the queue

    # Its fair-share tag while it waits in a lane, set by the queue (a lane holds the tasks
    # themselves: a million queued tasks need no million tuples).
    tag: float


@dataclass(eq=False, slots=True)
class NodeSlots:
    """A node as placement sees it: capabilities, capacity, and what its tasks hold of it.

    `running` is the slots in use. Capacities of 0 mean the node offers none of that resource.
    """

    node_id: str
    executors: frozenset[str]
    labels: Mapping[str, str]
    slots: int
    running: int = 0
    accepting: bool = True
    _: KW_ONLY
    closed_because: str = ""  # why it does not accept work, when it does not
    # The lowest priority level it takes now (0 critical .. 4 background), and why no lower.
    max_level: int = PRIORITY_LEVELS - 1
    limited_because: str = ""
    tripped: frozenset[str] = frozenset()  # executors not dispatched to now (circuit breakers)
    cpu_milli: int = 0
    memory_mb: int = 0
    gpus: int = 0
    models: frozenset[str] = frozenset()
    tools: frozenset[str] = frozenset()
    providers: frozenset[str] = frozenset()
    loaded_models: frozenset[str] = frozenset()  # in memory now (Ollama): no load time
    weight: float = 1.0
    used_cpu_milli: int = 0
    used_memory_mb: int = 0
    used_gpus: int = 0

    @property
    def free(self) -> int:
        """Free slots; 0 while the node does not accept work."""
        return self.slots - self.running if self.accepting else 0

    def has_room(self, r: Resources) -> bool:
        """Whether the node accepts work and has `r` free now."""
        return (
            self.accepting
            and self.slots - self.running >= r.slots
            and self.cpu_milli - self.used_cpu_milli >= r.cpu_milli
            and self.memory_mb - self.used_memory_mb >= r.memory_mb
            and self.gpus - self.used_gpus >= r.gpus
        )

    def take(self, r: Resources) -> None:
        """Hold `r` for a task (also one the node already runs when it reconnects)."""
        self.running += r.slots
        self.used_cpu_milli += r.cpu_milli
        self.used_memory_mb += r.memory_mb
        self.used_gpus += r.gpus

    def give(self, r: Resources) -> None:
        """Give back what a finished task held; never below zero."""
        self.running = max(0, self.running - r.slots)
        self.used_cpu_milli = max(0, self.used_cpu_milli - r.cpu_milli)
        self.used_memory_mb = max(0, self.used_memory_mb - r.memory_mb)
        self.used_gpus = max(0, self.used_gpus - r.gpus)


# -- conversion at the edge ------------------------------------------------------------------

_OPS = {
    task_pb2.LabelSelector.OPERATOR_UNSPECIFIED: Op.IN,
    task_pb2.LabelSelector.OPERATOR_IN: Op.IN,
    task_pb2.LabelSelector.OPERATOR_NOT_IN: Op.NOT_IN,
    task_pb2.LabelSelector.OPERATOR_EXISTS: Op.EXISTS,
    task_pb2.LabelSelector.OPERATOR_DOES_NOT_EXIST: Op.DOES_NOT_EXIST,
}
_ROUTINGS = {
    task_pb2.ROUTING_STRATEGY_LEAST_LOADED: Routing.LEAST_LOADED,
    task_pb2.ROUTING_STRATEGY_ROUND_ROBIN: Routing.ROUND_ROBIN,
    task_pb2.ROUTING_STRATEGY_RANDOM: Routing.RANDOM,
    task_pb2.ROUTING_STRATEGY_WEIGHTED: Routing.WEIGHTED,
    task_pb2.ROUTING_STRATEGY_AFFINITY: Routing.AFFINITY,
}


_VALUED = (Op.IN, Op.NOT_IN)


def _milli(cpu: float) -> int:
    """Cores as millicores, rounded up; NaN or negative asks none, infinity fits nowhere."""
    if math.isnan(cpu) or cpu <= 0:
        return 0
    return math.ceil(cpu * 1000) if math.isfinite(cpu) else _UNPLACEABLE


_PLAIN: dict[tuple[str, str, str, str], Requirements] = {}
"""The requirements of specs that ask for no more than an executor, model, tool or provider:
most specs; shared, since Requirements are immutable. Bounded by _PLAIN_MAX."""
_PLAIN_MAX = 4096
_PLAIN_KEYS: dict[str, Requirements] = {}
"""The same, by plain_key."""


def fields_of(spec: task_pb2.TaskSpec) -> dict[str, Any]:
    """The fields a spec sets, by name: one pass, cheaper than asking for each in turn."""
    return {fd.name: value for fd, value in spec.ListFields()}


_PLACING = frozenset(
    (
        "required_labels",
        "selectors",
        "preferred_labels",
        "resources",
        "routing",
        "affinity_key",
        "hard_affinity",
        "wait_for_node",
    )
)
"""TaskSpec fields that place a task beyond its kind, model, tool and provider."""


def requirements_of(spec: task_pb2.TaskSpec, fields: dict[str, Any] | None = None) -> Requirements:
    """A spec's placement, as plain values; never raises (validation rejects bad values first).
    `fields`: its fields_of, when the caller has them.

    An affinity key with no routing (or with hard affinity) means `affinity` routing; a soft
    key under another strategy is ignored. Operators default to IN, slots to 1, preference
    weights to 1 (0 or non-finite).
    """
    if fields is None:
        fields = fields_of(spec)
    if not _PLACING.isdisjoint(fields):
        return _placed(spec)
    # Most specs ask for a kind and perhaps a model: their requirements are shared.
    executor: str = spec.WhichOneof("kind") or ""
    tool = cloud = ""
    if executor == "custom":
        executor = spec.custom.executor
    elif executor == "tool":
        tool = spec.tool.name
    elif executor == "llm" and spec.llm.provider != "ollama":
        # A cloud provider's model is served by any node with its key, not listed.
        cloud = spec.llm.provider
    return _plain((executor, "" if cloud else fields.get("model", ""), tool, cloud))


def _plain(wants: tuple[str, str, str, str]) -> Requirements:
    """The shared requirements of (executor, model, tool, provider)."""
    plain = _PLAIN.get(wants)
    if plain is None:
        if len(_PLAIN) >= _PLAIN_MAX:
            _PLAIN.clear()
        executor, model, tool, provider = wants
        plain = _PLAIN[wants] = Requirements(
            PlacementClass(executor=executor, model=model, tool=tool, provider=provider)
        )
    return plain


_SEP = "\x1f"  # between the parts of a plain key (unit separator: in no name)


def plain_key(req: Requirements) -> str | None:
    """`req` as text, when it asks for no more than an executor, model, tool and provider (one
    of the shared ones requirements_of gives); else None. `plain_requirements` reads it."""
    cls = req.cls
    wants = (cls.executor, cls.model, cls.tool, cls.provider)
    if _PLAIN.get(wants) is not req:
        return None
    key = _SEP.join(wants)
    return key if key.count(_SEP) == 3 else None  # else a part holds the separator


def plain_requirements(key: str) -> Requirements:
    """The requirements of a plain_key (a restart asks for each stored task's)."""
    plain = _PLAIN_KEYS.get(key)
    if plain is None:
        if len(_PLAIN_KEYS) >= _PLAIN_MAX:
            _PLAIN_KEYS.clear()
        executor, model, tool, provider = key.split(_SEP)
        plain = _PLAIN_KEYS[key] = _plain((executor, model, tool, provider))
    return plain


def _placed(spec: task_pb2.TaskSpec) -> Requirements:
    """requirements_of a spec with labels, selectors, preferences, resources or routing."""
    cloud = spec.llm.provider if spec.HasField("llm") and spec.llm.provider != "ollama" else ""
    tool = spec.tool.name if spec.HasField("tool") else ""
    res = spec.resources
    resources = Resources(
        slots=max(1, res.slots),
        cpu_milli=_milli(res.cpu),
        memory_mb=res.memory_mb,
        gpus=res.gpus,
    )
    selectors = tuple(
        sorted(
            {
                Selector(s.key, op, tuple(sorted(set(s.values))) if op in _VALUED else ())
                for s in spec.selectors
                for op in (_OPS.get(s.operator, Op.IN),)
            }
        )
    )
    key = spec.affinity_key
    hard = bool(key) and spec.hard_affinity
    routing = _ROUTINGS.get(spec.routing)
    if hard or (routing is None and key):
        routing = Routing.AFFINITY
    cls = PlacementClass(
        executor=executor_of(spec),
        labels=frozenset(spec.required_labels.items()),
        selectors=selectors,
        model="" if cloud else spec.model,
        resources=resources,
        affinity_key=key if hard else "",
        tool=tool,
        provider=cloud,
        wait=spec.wait_for_node,
    )
    preferred = tuple(
        Preference(p.key, p.value, p.weight if math.isfinite(p.weight) and p.weight else 1.0)
        for p in spec.preferred_labels
    )
    return Requirements(cls, routing, preferred, key if routing is Routing.AFFINITY else "")


def node_slots_of(info: node_pb2.NodeInfo) -> NodeSlots:
    """A node's Hello as placement sees it: at least one slot, weight 1 unless positive."""
    r = info.resources
    weight = info.weight if math.isfinite(info.weight) and info.weight > 0 else 1.0
    return NodeSlots(
        info.node_id,
        frozenset(info.executors),
        dict(info.labels),
        max(1, info.slots),
        cpu_milli=r.cpus * 1000,
        memory_mb=r.memory_mb,
        gpus=r.gpus,
        models=frozenset(info.models) | frozenset(info.ollama_models),  # given, or found
        tools=frozenset(info.tools),
        providers=frozenset(info.llm_providers),
        loaded_models=frozenset(info.loaded_models),
        weight=weight,
    )


# -- routing strategies ----------------------------------------------------------------------


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


# -- the ready queue -------------------------------------------------------------------------


def _level(priority: int) -> int:
    return min(max(priority, 1), PRIORITY_LEVELS) - 1


class _Lane:
    """The FIFO of one (class, level, tenant); `gen` names its one live heap entry."""

    __slots__ = ("cls", "gen", "in_heap", "items", "level", "tenant")

    def __init__(self, cls: _Class, level: int, tenant: str) -> None:
        self.cls = cls
        self.level = level
        self.tenant = tenant
        self.items: deque[Queued] = deque()  # in tag order
        self.gen = 0
        self.in_heap = False


class _Class:
    """A placement class: its lanes, whether it is parked, and its cached fitting nodes."""

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


class ReadyQueue:
    """Ready tasks in lanes per (placement class, priority, tenant), fair between tenants.

    `len()` counts tasks still to dispatch; a task cancelled in the queue is `discard()`ed by
    the caller and dropped when it reaches the head of its lane.
    """

    def __init__(
        self, tenant_weights: Mapping[str, float] | None = None, *, idle_classes: int = 1024
    ) -> None:
        self._weights: dict[str, float] = {}
        for tenant, weight in (tenant_weights or {}).items():
            self.set_weight(tenant, weight)
        self._classes: dict[PlacementClass, _Class] = {}
        self._idle: OrderedDict[PlacementClass, _Class] = OrderedDict()  # kept for their state
        self._idle_cap = idle_classes
        self._heaps: list[list[_Entry]] = [[] for _ in range(PRIORITY_LEVELS)]
        self._vtime = [0.0] * PRIORITY_LEVELS
        self._last: list[dict[str, float]] = [{} for _ in range(PRIORITY_LEVELS)]
        self._prune_at = [1024] * PRIORITY_LEVELS
        self._blocked: dict[_Class, None] = {}  # parked classes, in parking order
        self._gen = count(1)
        self._size = 0
        self._woken = PRIORITY_LEVELS  # the lowest level a class was unparked into
        # Classes found with queued tasks and no node that could ever run them (not waiting
        # for one), since the caller last took them: see Scheduler.take_unoffered.
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
        level = _level(task.priority)
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
        level = _level(task.priority)
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

    def discard(self) -> None:
        """Account for a queued task that left the queue without being popped (cancelled)."""
        self._size -= 1

    def _lane(self, task: Queued, level: int) -> _Lane:
        key = task.placement.cls
        cls = self._classes.get(key)
        if cls is None:
            cls = self._idle.pop(key, None) or _Class(key)
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

    def _park(self, cls: _Class, level: int) -> None:
        """No task of `cls` can be placed at `level`: nor at any lower level."""
        cls.parked_from = min(cls.parked_from, level)
        self._blocked[cls] = None
        if not cls.offered:
            self._unoffered(cls)

    def _unoffered(self, cls: _Class) -> None:
        if not cls.key.wait:
            self.unoffered[cls.key] = None

    def _unpark(self, cls: _Class) -> None:
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

    def classes(self) -> Iterable[PlacementClass]:
        """The classes with queued tasks (or cancelled ones not yet dropped)."""
        return self._classes.keys()


# -- the scheduler ---------------------------------------------------------------------------


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


_RESOURCES = ("gpus", "memory_mb", "cpu_milli", "slots")  # the order explain() checks them


def _amount(attr: str, value: int) -> str:
    """A quantity of one resource, as people write it."""
    if attr == "memory_mb":
        return f"{value} MB"
    if attr == "cpu_milli":
        return f"{value / 1000:g} CPU" + ("" if value == 1000 else "s")
    return _plural(value, "GPU" if attr == "gpus" else "slot")


def _number(attr: str, value: int) -> str:
    return f"{value / 1000:g}" if attr == "cpu_milli" else str(value)


def _used(node: NodeSlots, attr: str) -> int:
    return node.running if attr == "slots" else int(getattr(node, "used_" + attr))


def _priority_name(level: int) -> str:
    """`HIGH` for level 1."""
    return task_pb2.Priority.Name(level + 1).removeprefix("PRIORITY_")  # type: ignore[arg-type]


def _limited(node: NodeSlots) -> str:
    """`takes only HIGH or higher priority now: its machine is busy`."""
    why = f": {node.limited_because}" if node.limited_because else ""
    return f"takes only {_priority_name(node.max_level)} or higher priority now{why}"


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
        for cls in list(self.queue._blocked):
            self.queue._unpark(cls)  # each checks again at its next turn

    def remove_node(self, node_id: str) -> None:
        if self.nodes.pop(node_id, None) is not None:
            self._version += 1
            for cls in list(self.queue._blocked):
                self.queue._unpark(cls)  # each checks again whether any node can run it

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
        level = _level(priority) if priority else PRIORITY_LEVELS - 1
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
            for cls in list(self.queue._blocked):
                self.queue._unpark(cls)

    def release(self, node: NodeSlots, task: Queued) -> None:
        """Give back what `task` held on `node` (its run ended); classes it can now take wake."""
        node.give(task.placement.cls.resources)
        if self.nodes.get(node.node_id) is node:
            self._wake(node)

    def _wake(self, node: NodeSlots) -> None:
        for cls in list(self.queue._blocked):
            if cls.version != self._version or (
                node.node_id in cls.node_ids
                and node.max_level >= cls.parked_from
                and node.has_room(cls.key.resources)
                and self._target_allows(cls.key, node.node_id)
            ):
                self.queue._unpark(cls)

    def _target_allows(self, key: PlacementClass, node_id: str) -> bool:
        if not key.affinity_key:
            return True
        target = self.affinity.get(key.affinity_key)
        return target is None or target == node_id

    def _fitting(self, cls: _Class) -> list[NodeSlots]:
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
        found = list(self.queue.unoffered)
        self.queue.unoffered.clear()
        return found

    def unoffered(self, key: PlacementClass) -> bool:
        """Whether `key` has queued tasks and still no connected node could ever run them."""
        cls = self.queue._classes.get(key)
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
        q = self.queue
        cls = q._classes.get(key)
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
                    q._enter(lane)  # its head changed: a new entry; the old one goes stale
            else:
                if lane.in_heap:
                    lane.gen = next(q._gen)  # its entry goes stale
                    lane.in_heap = False
                q._drop_lane(lane)
        return taken, heads

    # -- dispatch ----------------------------------------------------------------------------

    def schedule(self) -> list[tuple[Queued, NodeSlots]]:
        """Assign ready tasks while they fit, best first; each takes its request from its node."""
        q = self.queue
        out: list[tuple[Queued, NodeSlots]] = []
        if not q._size:  # (with no node each class is parked at once: none can run it)
            return out
        level = 0
        while level < PRIORITY_LEVELS:
            q._woken = PRIORITY_LEVELS
            self._drain(level, out)
            # Placing can wake a hard-affinity class (its key moved): it gets its turn now.
            level = min(level + 1, q._woken)
        return out

    def _drain(self, level: int, out: list[tuple[Queued, NodeSlots]]) -> None:
        """Dispatch from one level until each of its lanes is empty or its class parked."""
        q = self.queue
        heap = q._heaps[level]
        heappop, heappush, heapreplace = heapq.heappop, heapq.heappush, heapq.heapreplace
        vtime = q._vtime[level]
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
            if not task.queued:  # cancelled while queued: already discarded
                items.popleft()
                if items:
                    lane.gen = next(q._gen)
                    task = items[0]
                    heapreplace(heap, (task.tag, task.seq, lane.gen, lane))
                else:
                    heappop(heap)
                    lane.in_heap = False
                    q._drop_lane(lane)
                continue
            heappop(heap)  # before placing: that may unpark classes into this heap
            node = self._place(cls, task.placement, level)
            if node is None:
                lane.in_heap = False
                q._park(cls, level)
                continue
            items.popleft()
            q._size -= 1
            node.take(cls.key.resources)
            out.append((task, node))
            if tag > vtime:
                vtime = q._vtime[level] = tag
            if items:
                lane.gen = next(q._gen)
                task = items[0]
                heappush(heap, (task.tag, task.seq, lane.gen, lane))
            else:
                lane.in_heap = False
                q._drop_lane(lane)

    def _place(self, cls: _Class, req: Requirements, level: int) -> NodeSlots | None:
        """The node for the next task of `cls` at `level`, or None when no fitting node that
        takes that level has room."""
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
        return node

    def _remember(self, key: str, node_id: str) -> None:
        changed, evicted = self.affinity.remember(key, node_id)
        if (changed or evicted) and self.queue._blocked:
            # A hard-affinity class of this key (or the forgotten one) now waits elsewhere.
            for cls in list(self.queue._blocked):
                if cls.key.affinity_key and cls.key.affinity_key in (key, evicted):
                    self.queue._unpark(cls)

    # -- why pending -------------------------------------------------------------------------

    def explain(self, task: Queued) -> str:
        """Why a queued task is not running: the first constraint no connected node meets."""
        if not task.queued:
            return ""
        key = task.placement.cls
        res = key.resources
        level = _level(task.priority)
        nodes = sorted(self.nodes.values(), key=lambda n: n.node_id)
        nodes = [n for n in nodes if key.executor in n.executors]
        if not nodes:
            return f"no connected node offers executor {key.executor!r}"
        if all(key.executor in n.tripped for n in nodes):
            ids = ", ".join(n.node_id for n in nodes[:5])
            return f"the circuit breaker of executor {key.executor!r} is open on {ids}"
        nodes = [n for n in nodes if key.executor not in n.tripped]
        for k, v in sorted(key.labels):
            nodes = [n for n in nodes if n.labels.get(k) == v]
            if not nodes:
                return f"no node matches label {k}={v}"
        for s in key.selectors:
            nodes = [n for n in nodes if s.matches(n.labels)]
            if not nodes:
                return f"no node matches selector {s}"
        if key.model:
            nodes = [n for n in nodes if key.model in n.models]
            if not nodes:
                return f"no node offers model {key.model!r}"
        if key.tool:
            nodes = [n for n in nodes if key.tool in n.tools]
            if not nodes:
                return f"no node offers tool {key.tool!r}"
        if key.provider:
            nodes = [n for n in nodes if key.provider in n.providers]
            if not nodes:
                return f"no node has a key for LLM provider {key.provider!r}"
        for attr in _RESOURCES:
            need: int = getattr(res, attr)
            most = max(int(getattr(n, attr)) for n in nodes)
            if most < need:
                return (
                    f"needs {_amount(attr, need)}; the most any matching node has in all"
                    f" is {_number(attr, most)}"
                )
            nodes = [n for n in nodes if getattr(n, attr) >= need]
        if key.affinity_key:
            target = self.affinity.get(key.affinity_key)
            if target is not None:
                node = self.nodes.get(target)
                if node is None:
                    return f"hard affinity: waiting for node {target} (not connected)"
                if node not in nodes:
                    return f"hard affinity: waiting for node {target} (it no longer fits)"
                if not node.accepting:
                    return f"hard affinity: waiting for node {target} ({node.closed_because})"
                if node.max_level < level:
                    return f"hard affinity: waiting for node {target} (it {_limited(node)})"
                if not node.has_room(res):
                    return f"hard affinity: waiting for node {target} ({self._short([node], res)})"
                return "ready: waiting for the next dispatch"
        accepting = [n for n in nodes if n.accepting]
        if not accepting:
            if len(nodes) == 1:
                return f"the only fitting node ({nodes[0].node_id}) is {nodes[0].closed_because}"
            why = sorted({f"{n.node_id}: {n.closed_because}" for n in nodes})
            return f"no fitting node takes work ({'; '.join(why[:5])})"
        taking = [n for n in accepting if n.max_level >= level]
        if not taking:
            if len(accepting) == 1:
                return f"node {accepting[0].node_id} {_limited(accepting[0])}"
            why = [f"{n.node_id} {_limited(n)}" for n in accepting]
            return (
                f"no fitting node takes {_priority_name(level)} priority now ({'; '.join(why[:5])})"
            )
        accepting = taking
        if any(n.has_room(res) for n in accepting):
            return "ready: waiting for the next dispatch"
        return self._short(accepting, res)

    @staticmethod
    def _short(nodes: Sequence[NodeSlots], res: Resources) -> str:
        """What the fitting, accepting `nodes` lack for `res`."""
        for attr in _RESOURCES:
            need: int = getattr(res, attr)
            most = max(int(getattr(n, attr)) - _used(n, attr) for n in nodes)
            if most < need:
                if attr == "slots" and need == 1:
                    return f"waiting for a free slot on {_plural(len(nodes), 'fitting node')}"
                return (
                    f"needs {_amount(attr, need)}; the most any fitting node has free"
                    f" is {_number(attr, max(most, 0))}"
                )
        return (
            f"waiting for {_plural(len(nodes), 'fitting node')} to have all of its request"
            " free at once"
        )
