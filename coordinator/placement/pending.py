"""Why a queued task waits: the first constraint no connected node meets, as a sentence."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from shoal.coordinator.placement.model import NodeSlots, Queued, Resources, level_of
from shoal.coordinator.placement.routing import AffinityMap
from shoal.v1 import task_pb2

__all__ = ["explain"]


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


def explain(task: Queued, connected: Mapping[str, NodeSlots], affinity: AffinityMap) -> str:
    """Why a queued task is not running: the first constraint no `connected` node meets."""
    if not task.queued:
        return ""
    key = task.placement.cls
    res = key.resources
    level = level_of(task.priority)
    nodes = sorted(connected.values(), key=lambda n: n.node_id)
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
        nodes = [n for n in nodes if key.tool in n.offered(key.executor)]
        if not nodes:
            what = "function" if key.executor == "function" else "tool"
            return f"no node offers {what} {key.tool!r}"
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
        target = affinity.get(key.affinity_key)
        if target is not None:
            node = connected.get(target)
            if node is None:
                return f"hard affinity: waiting for node {target} (not connected)"
            if node not in nodes:
                return f"hard affinity: waiting for node {target} (it no longer fits)"
            if not node.accepting:
                return f"hard affinity: waiting for node {target} ({node.closed_because})"
            if node.max_level < level:
                return f"hard affinity: waiting for node {target} (it {_limited(node)})"
            if not node.has_room(res):
                return f"hard affinity: waiting for node {target} ({_short([node], res)})"
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
        return f"no fitting node takes {_priority_name(level)} priority now ({'; '.join(why[:5])})"
    accepting = taking
    if any(n.has_room(res) for n in accepting):
        return "ready: waiting for the next dispatch"
    return _short(accepting, res)


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
        f"waiting for {_plural(len(nodes), 'fitting node')} to have all of its request free at once"
    )
