"""POST /api/<package.Service>/<Method>: every unary method of the served services, derived
from their descriptors, calling the same servicer methods the gRPC server calls."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from shoal._gate import acting_as
from shoal.coordinator.http.auth import Caller
from shoal.coordinator.http.body import read_message
from shoal.coordinator.http.context import HttpCallContext
from shoal.coordinator.http.errors import error_response, unexpected_response
from shoal.errors import ShoalError

__all__ = ["API_PREFIX", "json_response", "method_path", "rpc_methods", "rpc_routes"]

API_PREFIX = "/api"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def method_path(method: MethodDescriptor) -> str:
    """The gRPC path of `method`, `/shoal.v1.Tasks/Submit`: its policy key, and its HTTP
    route after /api."""
    return f"/{method.containing_service.full_name}/{method.name}"


def rpc_methods(services: Mapping[ServiceDescriptor, Any]) -> list[MethodDescriptor]:
    """The methods served as POST routes: every unary one (a stream has its own route)."""
    return [
        m
        for service in services
        for m in service.methods
        if not m.client_streaming and not m.server_streaming
    ]


def json_response(message: Any, status: int = 200) -> web.Response:
    """`message` (a protobuf message, or plain JSON data) as a JSON response."""
    if not isinstance(message, dict | list):
        message = json_format.MessageToDict(message)
    return web.Response(
        status=status,
        text=json.dumps(message, separators=(",", ":")) + "\n",  # a line of its own in a shell
        content_type="application/json",
    )


def _handler(method: MethodDescriptor, servicer: Any, caller: Caller) -> Handler:
    path = method_path(method)
    request_class = message_factory.GetMessageClass(method.input_type)
    call = getattr(servicer, method.name)

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            # Who calls, before the body is read: a refused caller's body is never read.
            principal = caller.for_method(request, path)
            message = await read_message(request, request_class)
            context = HttpCallContext(request)
            if principal is None:
                response = await call(message, context)
            else:
                with acting_as(principal):
                    response = await call(message, context)
        except ShoalError as err:
            return error_response(err, path)
        except Exception:
            return unexpected_response(path)
        return json_response(response)

    return handle


def rpc_routes(services: Mapping[ServiceDescriptor, Any], caller: Caller) -> list[web.RouteDef]:
    """One POST route per unary method of `services` (descriptor -> its servicer)."""
    return [
        web.post(
            f"{API_PREFIX}{method_path(m)}",
            _handler(m, services[m.containing_service], caller),
        )
        for m in rpc_methods(services)
    ]
