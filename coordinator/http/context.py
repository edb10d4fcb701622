"""The context a servicer method gets when it is called over HTTP instead of gRPC."""

from __future__ import annotations

from aiohttp import web

from shoal._channel import CLIENT_KEY

__all__ = ["CLIENT_HEADER", "HttpCallContext"]

CLIENT_HEADER = "X-Shoal-Client"
"""The caller's own name, as gRPC callers give it in metadata (a place in line)."""


class HttpCallContext:
    """What the unary servicers read of a grpc.aio.ServicerContext, from an HTTP request: its
    metadata and its peer."""

    def __init__(self, request: web.Request) -> None:
        self._request = request

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        client = self._request.headers.get(CLIENT_HEADER)
        return ((CLIENT_KEY, client),) if client else ()

    def peer(self) -> str:
        return f"http:{self._request.remote or 'unknown'}"
