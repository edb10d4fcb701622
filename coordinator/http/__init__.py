"""The coordinator's HTTP/JSON API, live events (SSE) and dashboard, beside gRPC.

Routes come from the service descriptors; calls go through the same authorization
(`shoal._gate.authorize`) and the same servicer methods as gRPC calls.
"""

from shoal.coordinator.http.app import HttpServer

__all__ = ["HttpServer"]
