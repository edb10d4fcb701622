"""What every Shoal gRPC endpoint shares: options and the health service."""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

__all__ = ["grpc_options", "serve_health"]


def grpc_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Channel and server options shared by every Shoal endpoint."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]


async def serve_health(server: grpc.aio.Server, names: tuple[str, ...]) -> HealthServicer:
    """Register grpc.health.v1.Health reporting SERVING for '' and each named service."""
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for name in ("", *names):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    return health
