"""A task's requirements from its spec, and a node's slots from its Hello: protobuf stays here.

Most specs ask for no more than an executor, model, tool or provider: their `Requirements` are
shared, and `plain_key` writes them as the text the store keeps in `tasks.placement`.
"""

from __future__ import annotations

import math
from typing import Any

from shoal.coordinator.placement.model import (
    NodeSlots,
    Op,
    PlacementClass,
    Preference,
    Requirements,
    Resources,
    Routing,
    Selector,
)
from shoal.specs import executor_of, fields_of
from shoal.v1 import node_pb2, task_pb2

__all__ = ["fields_of", "node_slots_of", "plain_key", "plain_requirements", "requirements_of"]

_UNPLACEABLE = 1 << 62  # an infinite request: larger than any capacity

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
    elif executor == "function":
        tool = spec.function.name
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
    if spec.HasField("function"):
        tool = spec.function.name
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
        functions=frozenset(info.functions),
        providers=frozenset(info.llm_providers),
        loaded_models=frozenset(info.loaded_models),
        weight=weight,
    )
