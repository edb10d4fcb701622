"""The coordinator's HTTP server: the JSON API, live events and the dashboard, served by
aiohttp in the coordinator's own event loop beside the gRPC server."""

from __future__ import annotations

import importlib.metadata
import ipaddress
import logging
import os
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from google.protobuf.descriptor import ServiceDescriptor

from shoal._server import reason
from shoal.auth import Principal, Role
from shoal.coordinator.engine import Coordinator
from shoal.coordinator.http.auth import Caller, Sessions
from shoal.coordinator.http.errors import error_response
from shoal.coordinator.http.listener import Listener, connection_limit
from shoal.coordinator.http.login import login_routes
from shoal.coordinator.http.openapi import openapi_document
from shoal.coordinator.http.rpc import API_PREFIX, json_response, rpc_routes
from shoal.coordinator.http.sse import events_route
from shoal.coordinator.http.static import static_routes
from shoal.errors import InvalidArgument, NotFound, PermissionDenied
from shoal.v1 import tasks_pb2

__all__ = ["HttpServer"]

_log = logging.getLogger("shoal.http")

_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
_LOOPBACK_NAMES = frozenset({"localhost"})
TASKS = tasks_pb2.DESCRIPTOR.services_by_name["Tasks"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _is_loopback_host(host: str) -> bool:
    """Whether a Host header (name or address, with or without a port) names loopback."""
    if host.startswith("["):  # [::1]:7080
        name = host[1 : host.find("]")]
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    name = name.lower()
    if name in _LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _version() -> str:
    try:
        return importlib.metadata.version("shoal")
    except importlib.metadata.PackageNotFoundError:
        return "0"


class HttpServer:
    """Serves `services` (descriptor -> the servicer the gRPC server uses) over HTTP on
    `listen`; `start`, then `stop` (idempotent)."""

    def __init__(
        self,
        core: Coordinator,
        services: Mapping[ServiceDescriptor, Any],
        *,
        listen: str,
        policy: Mapping[str, frozenset[Role]],
        authenticate: Callable[[str], Principal] | None,
        tls: ssl.SSLContext | None = None,
        max_body_bytes: int = 4 << 20,
        standby: Callable[[], str | None] | None = None,
        max_connections: int = 10_000,
        handshake_timeout: float = 10.0,
    ) -> None:
        self._core = core
        self._listen = listen
        self._tls = tls
        # As gRPC's defaults: connections open at once (kept under half the open-file limit,
        # leaving gRPC room), and how long one has for its TLS handshake.
        self._max_connections = max_connections
        self._handshake_timeout = handshake_timeout
        # While `standby()` names the leader, every call is refused naming it (503), as gRPC's.
        self.caller = Caller(policy, authenticate, Sessions(), standby)
        app = web.Application(
            client_max_size=max_body_bytes,
            middlewares=[self._guard],
        )
        app.add_routes(rpc_routes(services, self.caller))
        app.add_routes(login_routes(self.caller, secure=tls is not None))
        document = openapi_document(services, _version())

        async def openapi(request: web.Request) -> web.StreamResponse:
            return json_response(document)

        app.add_routes([web.get(f"{API_PREFIX}/openapi.json", openapi)])
        tasks = services.get(TASKS)
        if tasks is not None:
            app.add_routes([events_route(tasks, self.caller)])
        app.add_routes(static_routes())
        self._app = app
        self._runner: web.AppRunner | None = None
        self._listener: Listener | None = None
        self.port = 0

    @property
    def url(self) -> str:
        host = self._listen.rsplit(":", 1)[0]
        return f"{'https' if self._tls else 'http'}://{host}:{self.port}/"

    @property
    def started(self) -> bool:
        return self._runner is not None

    async def start(self) -> None:
        """Bind and serve; OSError saying why when the address cannot be bound."""
        host, _, port = self._listen.rpartition(":")
        if not port.isdigit() or int(port) > 65535:
            raise OSError(
                f"cannot listen on {self._listen}: expected host:port, such as 127.0.0.1:7080"
            )
        runner = web.AppRunner(
            self._app,
            access_log=None,
            handle_signals=False,
            # In-flight calls get this long to finish at shutdown (the core has ended its
            # waits and event streams by then).
            shutdown_timeout=2.0,
            keepalive_timeout=75,
            max_line_size=8190,
            max_field_size=8190,
            max_headers=64,
            # A compressed body would be inflated past the cap before it is counted.
            auto_decompress=False,
            # A caller that goes away ends its call, as over gRPC (and its event stream).
            handler_cancellation=True,
        )
        await runner.setup()
        assert runner.server is not None
        listener = Listener(
            runner.server,
            limit=connection_limit(self._max_connections),
            tls=self._tls,
            handshake_timeout=self._handshake_timeout,
        )
        try:
            self.port = await listener.start(host.strip("[]"), int(port))
        except OSError as err:
            await runner.cleanup()
            if err.errno:  # the errno's own words say more than what Python put around them
                err = OSError(err.errno, os.strerror(err.errno))
            raise OSError(
                f"cannot listen on {self._listen} (HTTP): {reason(err, int(port))}"
            ) from None
        self._runner, self._listener = runner, listener

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.stop()
        if runner is not None:
            await runner.cleanup()

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Security headers on every answer; with auth off, only loopback Host names (a page
        elsewhere cannot reach this server by rebinding its name); API errors as JSON."""
        what = request.path[:200]
        if not self.caller.auth and not _is_loopback_host(request.host):
            response: web.StreamResponse = error_response(
                PermissionDenied(
                    "with auth off this server answers only requests addressed to a loopback"
                    " name (127.0.0.1, localhost)"
                ),
                what,
            )
        elif request.headers.get("Content-Encoding", "identity").lower() != "identity":
            response = error_response(
                InvalidArgument("compressed request bodies are not accepted"), what
            )
        else:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                if not request.path.startswith(f"{API_PREFIX}/") or exc.status < 400:
                    raise
                response = _api_error(exc, what)
        for key, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response


def _api_error(exc: web.HTTPException, what: str) -> web.StreamResponse:
    """aiohttp's own refusals (no route, wrong method) in the API's JSON shape."""
    if exc.status == 404:
        response = error_response(NotFound(f"no API route {what}"), what)
    elif exc.status == 405:
        response = error_response(InvalidArgument(f"{what} does not take this method"), what)
        response.set_status(405)
    else:
        response = error_response(InvalidArgument(exc.reason), what)
        response.set_status(exc.status)
    return response
