"""grpc.health.v1 Check of a Shoal server, as one of three answers."""

from __future__ import annotations

import enum

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["Health", "check_health"]


class Health(enum.Enum):
    """What a server's overall health check said; UNKNOWN when it did not answer."""

    SERVING = "SERVING"
    NOT_SERVING = "NOT_SERVING"
    UNKNOWN = "UNKNOWN"


async def check_health(channel: grpc.aio.Channel, *, timeout: float) -> Health:
    """One Check of the server's overall health (service ""), bounded by `timeout` seconds."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        response = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    except grpc.aio.AioRpcError:
        return Health.UNKNOWN
    if response.status == health_pb2.HealthCheckResponse.SERVING:
        return Health.SERVING
    if response.status == health_pb2.HealthCheckResponse.NOT_SERVING:
        return Health.NOT_SERVING
    return Health.UNKNOWN
