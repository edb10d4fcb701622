"""What every Shoal gRPC server shares: options, health, TLS, and the Gate every call passes."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gc
import inspect
import logging
import resource
import socket
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextvars import ContextVar
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

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
    "collect_seldom",
    "current_principal",
    "grpc_options",
    "listen",
    "method_path",
    "raise_open_files_limit",
    "reason",
    "serve_health",
    "server_credentials",
    "server_options",
]

_log = logging.getLogger("shoal")

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
OPEN: frozenset[Role] = frozenset()
"""Policy entry of a method anyone may call, unauthenticated."""
HEALTH_POLICY = {
    f"/{HEALTH_SERVICE}/{m.name}": OPEN
    for m in health_pb2.DESCRIPTOR.services_by_name["Health"].methods
}
"""Health is open, for probes: every Shoal server's policy includes this."""

_PRINCIPAL: ContextVar[Principal] = ContextVar("shoal_principal", default=ANONYMOUS)


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


_SPARE_FILES = 256
"""Open files a serving process keeps for what is not a connection (its store, logs, tasks)."""


def server_options(
    max_message_bytes: int,
    *,
    handshake_timeout: timedelta = timedelta(seconds=10),
    idle_timeout: timedelta = timedelta(minutes=5),
    max_connections: int = 10_000,
    max_streams: int = 1_000,
) -> list[tuple[str, Any]]:
    """grpc_options, and a server's bounds on connections: one that has not finished its TLS
    and HTTP/2 handshake within `handshake_timeout` (a socket that sends nothing) is closed,
    one without calls for `idle_timeout` is told to go (its client reconnects when it needs),
    beyond `max_connections` (kept under the open-file limit) new ones are refused, and one
    connection carries at most `max_streams` calls at once (more wait in the client)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft - _SPARE_FILES < max_connections:
        max_connections = max(16, soft - _SPARE_FILES)
    return [
        *grpc_options(max_message_bytes),
        ("grpc.server_handshake_timeout_ms", _millis(handshake_timeout)),
        ("grpc.max_connection_idle_ms", _millis(idle_timeout)),
        ("grpc.max_allowed_incoming_connections", max_connections),
        ("grpc.max_concurrent_streams", max_streams),
        # Flow-control windows stay at gRPC's 64 kB a stream: with bandwidth probing they grow
        # to megabytes, which a stranger fills before the Gate has refused its call (32 such
        # calls of 15 MB: +32 MB, or several times that on a busy machine; without: +2 MB).
        ("grpc.http2.bdp_probe", 0),
        # gRPC sets SO_REUSEPORT by default: a second server on the port would share it.
        ("grpc.so_reuseport", 0),
    ]


def _millis(d: timedelta) -> int:
    return max(1, round(d.total_seconds() * 1000))


def raise_open_files_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit (connections are files);
    returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as err:  # e.g. macOS: an unlimited hard limit
            _log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, err)
            return soft
    return hard


class _Health(HealthServicer):  # type: ignore[misc]
    """grpc.health.v1.Health with List, which grpcio-health-checking's servicer lacks."""

    async def List(
        self, request: health_pb2.HealthListRequest, context: Any
    ) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in self._server_status.items()
            }
        )


async def serve_health(server: grpc.aio.Server, names: tuple[str, ...]) -> HealthServicer:
    """Register grpc.health.v1.Health reporting SERVING for '' and each named service."""
    health = _Health()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for name in ("", *names):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    return health


def method_path(file: FileDescriptor, service: str, method: str) -> str:
    """The wire path (`/package.Service/Method`) of a method, from its descriptor."""
    desc = file.services_by_name[service]
    return f"/{desc.full_name}/{desc.methods_by_name[method].name}"


def server_credentials(
    cert: Path, key: Path, client_ca: Path | None, require_client_cert: bool
) -> grpc.ServerCredentials:
    """TLS from PEM files; with `require_client_cert`, clients need a cert signed by client_ca."""
    if require_client_cert and client_ca is None:
        raise ValueError("require_client_cert needs a client CA (tls_client_ca)")
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca else None,
        require_client_auth=require_client_cert,
    )


def listen(
    server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None = None
) -> int:
    """Have `server` listen on `address` (host:port); returns the port. OSError saying why
    when it cannot (gRPC itself says only that it failed)."""
    why = _cannot_bind(address)
    port = 0
    if not why:
        try:
            if credentials is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, credentials)
        except RuntimeError:
            pass
    if not port:
        why = why or _cannot_bind(address)
        if not why:  # the address is free: gRPC refused what came with it
            why = "refused by gRPC"
            if credentials is not None:
                why = "the TLS certificate or key is unusable (each a PEM file, of one key pair)"
        raise OSError(f"cannot listen on {address}: {why}")
    return port


def _cannot_bind(address: str) -> str:
    """Why `address` cannot be bound ('' if it can now), tried with a socket of our own."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        return "expected host:port, such as 127.0.0.1:7070"
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, int(port), type=socket.SOCK_STREAM)
        family, kind, proto, _, sockaddr = infos[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
            sock.bind(sockaddr)
    except OSError as err:  # gaierror included: a host that does not resolve
        return reason(err, int(port))
    return ""


def reason(err: OSError, port: int = 0) -> str:
    """What went wrong, in lower case to follow a colon: `address already in use`, and by
    whom when a process this one may see listens on `port`."""
    why = err.strerror or str(err)
    why = why[:1].lower() + why[1:]
    if err.errno == errno.EADDRINUSE and port:
        why += _holder(port)
    return why


def _holder(port: int) -> str:
    """` by pid N (name)` of the process listening on TCP `port`, if this one may see it."""
    import psutil  # only on this way out

    try:
        for conn in psutil.net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                return f" by pid {conn.pid} ({psutil.Process(conn.pid).name()})" if conn.pid else ""
    except (psutil.Error, OSError):
        pass
    return ""


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


def collect_seldom() -> None:
    """Tune the cyclic collector for a process that holds many objects for long (queued tasks,
    events): by default it walks all of them every few hundred thousand allocations, each
    time stopping the process for 50-150 ms under load. What exists now is kept out of its
    collections (gc.freeze), and it runs every 10,000 allocations instead of every 700."""
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


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
