"""The bounds on what a node says in its Hello (the checks on submitted specs, which the node
uses too, are in `shoal.validation`)."""

from __future__ import annotations

from shoal.auth import Principal, Role
from shoal.errors import InvalidArgument, PermissionDenied
from shoal.v1 import node_pb2
from shoal.validation import Limits

__all__ = ["check_hello", "drop_unserved"]


# What a node may claim beyond its slots: larger resources are refused as not real.
MAX_NODE_CPUS = 1 << 16
MAX_NODE_MEMORY_MB = 1 << 32  # 4 PiB
MAX_NODE_GPUS = 1024
MAX_NODE_WEIGHT = 1e6
# The executors that serve what a Hello may list (models only with an executor that serves
# them, which the node's token must allow).
_SERVED_BY = {
    "models": ("ollama", "llm"),
    "ollama_models": ("ollama",),
    "loaded_models": ("ollama",),
    "tools": ("tool",),
    "llm_providers": ("llm",),
    "functions": ("function",),
}
MAX_NODE_FUNCTIONS = 4096  # a node's functions: many modules may each hold dozens


def check_hello(hello: node_pb2.Hello, by: Principal, limits: Limits) -> None:
    """Refuse a Hello whose identity or capabilities go beyond what its credentials allow."""
    info = hello.info
    if len(hello.running) > limits.max_batch:
        raise InvalidArgument(f"a node runs at most {limits.max_batch} tasks")
    if by.role is Role.NODE and not by.may_be_node(info.node_id):
        raise PermissionDenied(f"token {by.name!r} may connect as node {by.node_id!r} only")
    if by.cert_name and info.node_id != by.cert_name:
        raise PermissionDenied(f"the client certificate is for {by.cert_name!r}, not this node")
    if by.executors and (extra := set(info.executors) - by.executors):
        raise PermissionDenied(f"token {by.name!r} may not offer executors {sorted(extra)}")
    if by.labels and (extra := {k for k, v in info.labels.items() if by.labels.get(k) != v}):
        raise PermissionDenied(f"token {by.name!r} may not claim labels {sorted(extra)}")
    lists = [
        info.executors,
        info.labels,
        info.detected_gpus,
        *(getattr(info, name) for name in _SERVED_BY),
    ]
    if any(len(xs) > limits.max_labels for xs in lists if xs is not info.functions) or (
        len(info.functions) > MAX_NODE_FUNCTIONS
    ):
        raise InvalidArgument(
            f"node info over its bounds: at most {limits.max_labels} labels, executors, gpus,"
            f" models and tools"
        )
    strings = (
        info.node_id,
        info.hostname,
        info.version,
        info.python_version,
        *info.labels.values(),
        *(gpu.name for gpu in info.detected_gpus),
        *(x for xs in lists if xs is not info.detected_gpus for x in xs),
    )
    if any(len(s) > limits.max_string or not s.isprintable() for s in strings):
        # (What a node says of itself is shown in listings and terminals.)
        raise InvalidArgument(
            f"node info over its bounds: its names, labels and versions printable text of at"
            f" most {limits.max_string} characters each"
        )
    r = info.resources
    if (
        info.slots > limits.max_node_slots
        or r.cpus > MAX_NODE_CPUS
        or r.memory_mb > MAX_NODE_MEMORY_MB
        or r.gpus > MAX_NODE_GPUS
        or not info.weight <= MAX_NODE_WEIGHT  # also NaN
    ):
        raise InvalidArgument(
            f"node info over its bounds: at most {limits.max_node_slots} slots,"
            f" {MAX_NODE_CPUS} cpus, {MAX_NODE_MEMORY_MB} MB, {MAX_NODE_GPUS} gpus,"
            f" weight {MAX_NODE_WEIGHT:g}"
        )


def drop_unserved(info: node_pb2.NodeInfo) -> list[str]:
    """Clear what a node lists without offering an executor that serves it (models without
    ollama or llm, tools without tool, ...: its token may not allow them, or its machine only
    happens to have them); returns the names of the fields cleared."""
    dropped = []
    for name, executors in _SERVED_BY.items():
        if getattr(info, name) and not any(e in info.executors for e in executors):
            info.ClearField(name)  # type: ignore[arg-type]
            dropped.append(name)
    return dropped
