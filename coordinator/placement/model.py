"""What placement works with: a task's requirements and placement class, and a node's slots.

What a task asks is its `Requirements`: a `PlacementClass` (everything that decides *which*
nodes can run it: executor, exact labels, selectors, model, resource request, hard affinity
key) and how to rank those nodes (routing strategy, preferred labels, soft affinity key).

Resources. A node's capacity is what it reports: slots, CPUs, memory, GPUs. Zero (or nothing
reported) means none: a node that reports no GPUs takes only tasks that request no GPUs. CPU
is counted in millicores so the ledger is exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field
from enum import StrEnum
from typing import Protocol

__all__ = [
    "PRIORITY_LEVELS",
    "NodeSlots",
    "Op",
    "PlacementClass",
    "Preference",
    "Queued",
    "Requirements",
    "Resources",
    "Routing",
    "Selector",
    "level_of",
]

PRIORITY_LEVELS = 5


def level_of(priority: int) -> int:
    """The queue level of a priority: 0 (critical) .. PRIORITY_LEVELS - 1 (background)."""
    return min(max(priority, 1), PRIORITY_LEVELS) - 1


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
    tool: str = ""  # a tool task's tool (a function task's function), which the node must offer
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
            and (not self.tool or self.tool in node.offered(self.executor))
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
    functions: frozenset[str] = frozenset()  # Python functions (import paths) it runs
    providers: frozenset[str] = frozenset()
    loaded_models: frozenset[str] = frozenset()  # in memory now (Ollama): no load time
    weight: float = 1.0
    used_cpu_milli: int = 0
    used_memory_mb: int = 0
    used_gpus: int = 0

    def offered(self, executor: str) -> frozenset[str]:
        """The names it offers to `executor`'s tasks: its functions, or its tools."""
        return self.functions if executor == "function" else self.tools

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
