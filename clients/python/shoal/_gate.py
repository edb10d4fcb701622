"""The Gate every call to a Shoal gRPC server passes: who calls, whether they may
(`authorize`, shared with the HTTP API), and each error turned into its status."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from shoal._status import abort
from shoal.auth import ANONYMOUS, Principal, Role
from shoal.errors import InvalidArgument, PermissionDenied, Unauthenticated, Unavailable

__all__ = [
    "HEALTH_POLICY",
    "HEALTH_SERVICE",
    "OPEN",
    "Gate",
    "acting_as",
    "authorize",
    "current_principal",
]

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
OPEN: frozenset[Role] = frozenset()
"""Policy entry of a method anyone may call, unauthenticated."""
HEALTH_POLICY = {
    f"/{HEALTH_SERVICE}/{m.name}": OPEN
    for m in health_pb2.DESCRIPTOR.services_by_name["Health"].methods
}
"""Health is open, for probes: every Shoal server's policy includes this."""

_PRINCIPAL: ContextVar[Principal] = ContextVar("shoal_principal", default=ANONYMOUS)


def current_principal() -> Principal:
    """The caller of the RPC being served (set by the Gate)."""
    return _PRINCIPAL.get()


@contextlib.contextmanager
def acting_as(principal: Principal) -> Iterator[None]:
    """Serve a call as `principal` (what `current_principal` says) within this block."""
    reset = _PRINCIPAL.set(principal)
    try:
        yield
    finally:
        _PRINCIPAL.reset(reset)


def authorize(
    policy: Mapping[str, frozenset[Role]],
    authenticate: Callable[[str], Principal] | None,
    method: str,
    token: Callable[[], str],
    *,
    standby: Callable[[], str | None] | None = None,
) -> Principal | None:
    """Who calls `method` with the token `token()` gives ('' when none was sent; asked only
    when needed), if they may (None: anyone may, unauthenticated); Unauthenticated or
    PermissionDenied if not. A method missing from `policy` is admin only; `authenticate`
    None: auth is off. While `standby()` names a leader, every call but health's is
    Unavailable. Every transport (gRPC, HTTP) decides here."""
    if standby is not None and not method.startswith(f"/{HEALTH_SERVICE}/"):
        leader = standby()
        if leader is not None:
            raise Unavailable(f"this coordinator stands by: {leader}")
    roles = policy.get(method, frozenset({Role.ADMIN}))
    if not roles:  # OPEN
        return None
    if authenticate is None:
        principal = ANONYMOUS
    else:
        sent = token()
        if not sent:
            raise Unauthenticated("no credentials: send `authorization: Bearer <token>`")
        principal = authenticate(sent)
    if principal.role is not Role.ADMIN and principal.role not in roles:
        raise PermissionDenied(f"{principal.name} ({principal.role}) may not call {method}")
    return principal


class _Malformed:
    """A request that did not parse; the Gate answers it with INVALID_ARGUMENT."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def _bearer(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = str(value).partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("authorization metadata must be `Bearer <token>`")
            return token.strip()
    return ""


def _cert_name(context: Any) -> str:
    names = (context.auth_context() or {}).get("x509_common_name")
    return names[0].decode() if names else ""


def _parsed(request: Any) -> Any:
    if isinstance(request, _Malformed):
        raise InvalidArgument(f"malformed request: {request.error}")
    return request


class Gate(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Every call passes here, whatever its shape: it authenticates the caller, checks the
    caller's role against `policy` (a method missing from it is admin only), refuses malformed
    requests, and turns every error into its status. `authenticate` None: auth is off.
    `client_certs`: callers may present certificates (TLS with a client CA), whose common
    name is then the principal's cert_name.
    """

    def __init__(
        self,
        policy: Mapping[str, frozenset[Role]],
        authenticate: Callable[[str], Principal] | None,
        *,
        client_certs: bool = True,
        standby: Callable[[], str | None] | None = None,
    ) -> None:
        self._policy = policy
        self._authenticate = authenticate
        self._client_certs = client_certs
        self._standby = standby

    def _caller(self, method: str, metadata: Any) -> Principal | None:
        """Who calls `method`, if they may (None: anyone may); from the call's metadata alone,
        before its request is read."""
        return authorize(
            self._policy,
            self._authenticate,
            method,
            lambda: _bearer(metadata),
            standby=self._standby,
        )

    def _admit(self, principal: Principal | None, context: Any) -> None:
        if principal is None:
            return
        cert = _cert_name(context) if self._client_certs else ""
        if cert:
            principal = dataclasses.replace(principal, cert_name=cert)
        _PRINCIPAL.set(principal)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        # gRPC reads a unary request whole before its handler runs: a caller refused here
        # never has its request read, so a stranger's large body costs the server nothing.
        try:
            principal = self._caller(details.method, details.invocation_metadata)
        except Exception as err:
            return _refusal(handler, details.method, err)
        return self._guard(handler, details.method, principal)

    def _guard(self, handler: Any, method: str, principal: Principal | None) -> Any:
        parse = handler.request_deserializer

        def lenient(raw: bytes) -> Any:
            try:
                return parse(raw) if parse else raw
            except Exception as err:
                return _Malformed(err)

        admit = self._admit

        async def checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
            async for request in requests:
                yield _parsed(request)

        if handler.request_streaming:
            inner = handler.stream_stream or handler.stream_unary

            def arg(request: Any) -> Any:
                return checked(request)
        else:
            inner = handler.unary_stream or handler.unary_unary
            arg = _parsed

        if handler.response_streaming and inspect.isasyncgenfunction(inner):

            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                try:
                    admit(principal, context)
                    async for response in inner(arg(request), context):
                        yield response
                except grpc.aio.AbortError:
                    raise
                except Exception as err:
                    await abort(context, err, method)

            behaviour: Any = stream
        else:

            async def call(request: Any, context: Any) -> Any:
                try:
                    admit(principal, context)
                    return await inner(arg(request), context)
                except grpc.aio.AbortError:
                    raise
                except Exception as err:
                    await abort(context, err, method)

            behaviour = call

        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[handler.request_streaming, handler.response_streaming]
        return make(
            behaviour,
            request_deserializer=lenient,
            response_serializer=handler.response_serializer,
        )


def _refusal(handler: Any, method: str, error: Exception) -> Any:
    """A handler that answers `error` without reading the request: it takes the request as a
    stream, which gRPC reads only when asked."""

    async def refuse(requests: Any, context: Any) -> None:
        await abort(context, error, method)

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            refuse, response_serializer=handler.response_serializer
        )
    return grpc.stream_unary_rpc_method_handler(
        refuse, response_serializer=handler.response_serializer
    )
