"""The node's health, by name: the node (''), its Node service and each of its executors."""

from __future__ import annotations

from collections.abc import Iterable

from grpc_health.v1 import health_pb2

from shoal.v1 import node_pb2

__all__ = ["EXECUTOR_HEALTH_PREFIX", "NODE_SERVICE", "executor_health_name", "node_health"]

NODE_SERVICE = node_pb2.DESCRIPTOR.services_by_name["Node"].full_name
EXECUTOR_HEALTH_PREFIX = "shoal.node.executor."

_SERVING: int = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING: int = health_pb2.HealthCheckResponse.NOT_SERVING


def executor_health_name(executor: str) -> str:
    """The health-check name of an executor: `shoal.node.executor.shell`."""
    return EXECUTOR_HEALTH_PREFIX + executor


def node_health(executors: Iterable[str], *, draining: bool, throttled: bool) -> dict[str, int]:
    """Every name's status: NOT_SERVING while the node drains or its resource guard throttles
    it (it takes no new work, or only urgent work), else SERVING."""
    status = _NOT_SERVING if draining or throttled else _SERVING
    names = ["", NODE_SERVICE, *(executor_health_name(e) for e in sorted(executors))]
    return dict.fromkeys(names, status)
