"""What every Shoal gRPC server shares but its Gate (`shoal._gate`): options, health, TLS,
listening, and the collector's tuning."""

from __future__ import annotations

import errno
import gc
import logging
import resource
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

__all__ = [
    "collect_seldom",
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


def collect_seldom() -> None:
    """Tune the cyclic collector for a process that holds many objects for long (queued tasks,
    events): by default it walks all of them every few hundred thousand allocations, each
    time stopping the process for 50-150 ms under load. What exists now is kept out of its
    collections (gc.freeze), and it runs every 10,000 allocations instead of every 700."""
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
