"""The coordinator process: the gRPC server around the core, with health and reflection."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Self

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from shoal._gate import HEALTH_POLICY, HEALTH_SERVICE, OPEN, Gate
from shoal._reflection import serve_reflection
from shoal._server import (
    collect_seldom,
    listen,
    method_path,
    serve_health,
    server_credentials,
    server_options,
)
from shoal._signals import until_signalled
from shoal.auth import Role
from shoal.config import ADMIN_TOKEN_FILE, STORE_FILE, CoordinatorSettings
from shoal.coordinator.adopt import Adopter, NodeTls
from shoal.coordinator.api import AdminService, LocksService, NodeGatewayService, TasksService
from shoal.coordinator.discovery import CoordinatorDiscovery
from shoal.coordinator.engine import Coordinator
from shoal.coordinator.metrics import MetricsServer
from shoal.coordinator.store import SqliteStore, Store
from shoal.discovery import advertises, is_loopback
from shoal.errors import FailedPrecondition
from shoal.handshake import OwnAddresses
from shoal.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    locks_pb2,
    locks_pb2_grpc,
    tasks_pb2,
    tasks_pb2_grpc,
)

__all__ = ["POLICY", "SERVICE_NAMES", "CoordinatorServer", "is_loopback"]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


if TYPE_CHECKING:
    from shoal.coordinator.http import HttpServer
    from shoal.coordinator.store.postgres import PostgresStore


def _store(settings: CoordinatorSettings) -> tuple[Store, PostgresStore | None]:
    """The store the settings name: PostgreSQL by URL (also returned as such: it leads or
    stands by), else SQLite in the data dir."""
    if settings.store.startswith(("postgresql://", "postgres://")):
        # Imported when asked for: psycopg is not what every coordinator needs at start.
        from shoal.coordinator.store.postgres import PostgresStore

        pg = PostgresStore(settings.store)
        return pg, pg
    if settings.store:
        raise FailedPrecondition("store must be empty (SQLite in data_dir) or a postgresql:// URL")
    return SqliteStore(settings.data_dir / STORE_FILE, synchronous=settings.synchronous), None


_log = logging.getLogger("shoal.coordinator")

SERVICE_NAMES = (
    tasks_pb2.DESCRIPTOR.services_by_name["Tasks"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
    gateway_pb2.DESCRIPTOR.services_by_name["NodeGateway"].full_name,
    locks_pb2.DESCRIPTOR.services_by_name["Locks"].full_name,
)

_MAX_HTTP_BODY = 4 << 20  # JSON takes more memory to parse than protobuf: a tighter cap

_SUBMIT = frozenset({Role.SUBMITTER})
_READ = frozenset({Role.SUBMITTER, Role.READER})
POLICY: dict[str, frozenset[Role]] = {
    **{method_path(tasks_pb2.DESCRIPTOR, "Tasks", m): _SUBMIT for m in ("Submit", "SubmitBatch")},
    method_path(tasks_pb2.DESCRIPTOR, "Tasks", "Cancel"): _SUBMIT,
    **{method_path(tasks_pb2.DESCRIPTOR, "Tasks", m): _READ for m in ("Get", "Wait", "List")},
    method_path(tasks_pb2.DESCRIPTOR, "Tasks", "Watch"): _READ,
    method_path(admin_pb2.DESCRIPTOR, "Admin", "ListNodes"): frozenset({Role.READER}),
    method_path(admin_pb2.DESCRIPTOR, "Admin", "GetOverview"): _READ,
    method_path(gateway_pb2.DESCRIPTOR, "NodeGateway", "Connect"): frozenset({Role.NODE}),
    # A node asks the coordinator it found to prove itself before it sends its token.
    method_path(gateway_pb2.DESCRIPTOR, "NodeGateway", "Identify"): OPEN,
    **{
        method_path(locks_pb2.DESCRIPTOR, "Locks", m): _SUBMIT
        for m in ("Acquire", "Renew", "Release")
    },
    **HEALTH_POLICY,
}
"""Which roles may call each method besides admin; a method not listed is admin only."""


class CoordinatorServer:
    """Runs the core behind a gRPC server: `run()` until signalled, or `async with`, or
    `start` then `stop` (idempotent)."""

    def __init__(self, settings: CoordinatorSettings) -> None:
        self.settings = settings
        store, self.pg = _store(settings)
        self.deposed = asyncio.Event()
        """Set once another coordinator took over: this one stopped serving."""
        self.core = Coordinator(
            store,
            settings,
        )
        self._server: grpc.aio.Server | None = None
        self._health: HealthServicer | None = None
        self._metrics: MetricsServer | None = None
        self.http: HttpServer | None = None
        self.discovery: CoordinatorDiscovery | None = None
        self.adopter: Adopter | None = None
        self.port = 0
        self._own = OwnAddresses(0, settings.reachable_at)  # port: once it listens
        self.core_started = False
        self._deposing: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        host = self.settings.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    @property
    def metrics_address(self) -> str:
        """host:port of /metrics, when served."""
        if self._metrics is None:
            return ""
        return f"{self.settings.metrics_listen.rpartition(':')[0]}:{self._metrics.port}"

    @property
    def admin_token_path(self) -> Path:
        return self.settings.data_dir / ADMIN_TOKEN_FILE

    @property
    def http_url(self) -> str:
        """Where the HTTP API and dashboard are served ('' when they are not)."""
        return self.http.url if self.http is not None else ""

    def _check_settings(self) -> None:
        s = self.settings
        for address in (s.listen, s.http_listen):
            if address and not s.auth and not is_loopback(address):
                raise FailedPrecondition(
                    f"refusing to listen on {address} with auth off: anyone who reaches it"
                    " could run code here. Turn auth on, or bind 127.0.0.1."
                )
        if s.heartbeat_interval * 3 > s.lease:
            raise FailedPrecondition(
                f"the lease ({s.lease.total_seconds():g} s) must be at least three heartbeat"
                f" intervals ({s.heartbeat_interval.total_seconds():g} s)"
            )
        if (s.tls_cert is None) != (s.tls_key is None):
            raise FailedPrecondition("TLS needs both tls_cert and tls_key")
        if s.require_client_cert and (s.tls_cert is None or s.tls_client_ca is None):
            raise FailedPrecondition(
                "require_client_cert needs tls_cert, tls_key and tls_client_ca"
            )
        if (s.adopt or s.nodes) and s.tls_cert is not None and s.tls_client_ca is None:
            raise FailedPrecondition(
                "adopting nodes with TLS needs tls_client_ca, the CA of the nodes' certificates"
            )
        if s.tls_client_ca is not None and not s.require_client_cert:
            # gRPC's Python API either requires and verifies client certificates or never asks
            # for them: with a client CA alone, certificate names would go unchecked.
            raise FailedPrecondition(
                "tls_client_ca needs require_client_cert: without it clients are never asked"
                " for a certificate, so certificate names would go unchecked"
            )
        for address in (s.listen, s.http_listen):
            if address and s.tls_cert is None and not is_loopback(address):
                _log.warning(
                    "listening on %s without TLS: tokens cross the network in clear", address
                )

    def _standby(self) -> str | None:
        """Who leads while this one stands by (its address, or a phrase); None once it leads."""
        if self.pg is None or self.core_started:
            return None
        leader = self.pg.leader
        if leader is None or not leader.live:
            return "no coordinator leads right now"
        return f"the leader is at {leader.address}"

    def _lost(self, reason: str) -> None:
        if not self.deposed.is_set():
            self.deposed.set()
            self._deposing = asyncio.get_running_loop().create_task(self.stop(grace=0))

    async def start(self) -> None:
        self._check_settings()
        # Ports first: one another process holds ends the start at once, not after recovery.
        server = await self._listen()
        try:
            if self.pg is not None:
                # A standby answers from the start: health NOT_SERVING, calls UNAVAILABLE.
                own = self.settings.reachable_at[0] if self.settings.reachable_at else ""
                self.pg.leadership.address = own or self.address
                self.pg.on_lost = self._lost
                await self._set_health(NOT_SERVING)
                await server.start()
                await self._start_http()
                # Every coordinator of the store advertises: nodes that find them by mDNS
                # follow the one whose health is SERVING.
                await self._start_discovery()
            await self.core.start()
            self.core_started = True
            await self._set_health(SERVING)
        except BaseException:
            await self._stop_discovery()
            await self._stop_metrics()
            await self._stop_http()
            await server.stop(None)
            raise
        try:
            await self._serve(server)
        except BaseException:
            await self._stop_discovery()
            await self._stop_metrics()
            await self.core.stop()
            await self._stop_http()
            self._server = None
            await server.stop(None)
            raise

    async def _listen(self) -> grpc.aio.Server:
        """The gRPC server with its services, bound to its port (serving nothing yet), and
        the metrics server."""
        s = self.settings
        gate = Gate(
            POLICY,
            self.core.tokens.authenticate if s.auth else None,
            client_certs=s.require_client_cert,
            standby=self._standby if self.pg is not None else None,
        )
        options = server_options(
            s.max_message_bytes,
            handshake_timeout=s.handshake_timeout,
            idle_timeout=s.idle_timeout,
            max_connections=s.max_connections,
            max_streams=s.max_streams,
        )
        server = grpc.aio.server(options=options, interceptors=[gate])
        tasks = TasksService(self.core)
        admin = AdminService(self.core)
        locks = LocksService(self.core)
        tasks_pb2_grpc.add_TasksServicer_to_server(tasks, server)
        admin_pb2_grpc.add_AdminServicer_to_server(admin, server)
        gateway_pb2_grpc.add_NodeGatewayServicer_to_server(
            NodeGatewayService(self.core, self._own), server
        )
        locks_pb2_grpc.add_LocksServicer_to_server(locks, server)
        if s.http_listen:
            from shoal.coordinator.http import HttpServer  # aiohttp: only when it serves

            self.http = HttpServer(
                self.core,
                {
                    tasks_pb2.DESCRIPTOR.services_by_name["Tasks"]: tasks,
                    admin_pb2.DESCRIPTOR.services_by_name["Admin"]: admin,
                    locks_pb2.DESCRIPTOR.services_by_name["Locks"]: locks,
                },
                listen=s.http_listen,
                policy=POLICY,
                authenticate=self.core.tokens.authenticate if s.auth else None,
                tls=self._http_tls(),
                max_body_bytes=min(s.max_message_bytes, _MAX_HTTP_BODY),
                standby=self._standby if self.pg is not None else None,
                max_connections=s.max_connections,
                handshake_timeout=s.handshake_timeout.total_seconds(),
            )
        self._health = await serve_health(server, SERVICE_NAMES)
        serve_reflection(server, (*SERVICE_NAMES, HEALTH_SERVICE))
        credentials = None
        if s.tls_cert is not None and s.tls_key is not None:
            credentials = server_credentials(
                s.tls_cert, s.tls_key, s.tls_client_ca, s.require_client_cert
            )
        self.port = listen(server, s.listen, credentials)
        self._own.port = self.port
        if s.metrics_listen:
            metrics = MetricsServer(self.core, s.metrics_listen)
            try:
                metrics.start()
            except BaseException:
                await server.stop(None)
                raise
            self._metrics = metrics
            _log.info("metrics on http://%s/metrics", self.metrics_address)
        return server

    def _http_tls(self) -> ssl.SSLContext | None:
        """TLS for HTTP from the same files as gRPC's (client certificates required alike)."""
        s = self.settings
        if s.tls_cert is None or s.tls_key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(s.tls_cert, s.tls_key)
            if s.require_client_cert and s.tls_client_ca is not None:
                context.load_verify_locations(s.tls_client_ca)
                context.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as err:
            raise FailedPrecondition(
                f"the TLS certificate or key is unusable for HTTP: {err}"
            ) from None
        return context

    async def _start_http(self) -> None:
        """Serve HTTP (once): a standby does from the start, refusing calls as gRPC does."""
        if self.http is not None and not self.http.started:
            await self.http.start()
            _log.info("HTTP API and dashboard on %s", self.http.url)

    async def _stop_http(self) -> None:
        http, self.http = self.http, None
        if http is not None:
            await http.stop()

    async def _start_discovery(self) -> None:
        """Advertise on mDNS (by the `advertise` rule) and, when adopting, browse for nodes."""
        s = self.settings
        advertise = advertises(s.advertise, s.listen)
        if not (advertise or s.adopt):  # an adopting coordinator browses for nodes to dial
            return
        discovery = CoordinatorDiscovery(
            s,
            self.port,
            advertise=advertise,
            on_nodes=self.adopter.discovered if s.adopt and self.adopter else None,
        )
        try:
            await discovery.async_start()
        except (OSError, RuntimeError) as err:  # no multicast here: serve all the same
            _log.error("cannot use mDNS (%s); nodes need its address", err)
            await discovery.async_stop()
        else:
            self.discovery = discovery
            self.core.discovered = discovery.nodes

    async def _stop_discovery(self) -> None:
        discovery, self.discovery = self.discovery, None
        if discovery is not None:
            # Nodes hear the goodbye and look for their coordinator again.
            self.core.discovered = dict
            await discovery.async_stop()

    async def _set_health(self, status: int) -> None:
        if self._health is not None:
            for name in ("", *SERVICE_NAMES):
                await self._health.set(name, status)

    async def _stop_metrics(self) -> None:
        metrics, self._metrics = self._metrics, None
        if metrics is not None:
            await metrics.stop()

    async def _serve(self, server: grpc.aio.Server) -> None:
        s = self.settings
        # Coordinators sharing a store each keep the local admin token of their own machine.
        name = "local-admin" if self.pg is None else f"local-admin@{socket.gethostname()}"
        if s.auth and await self.core.tokens.bootstrap_admin(self.admin_token_path, name):
            _log.info("wrote a new admin token to %s", self.admin_token_path)
        if self.pg is None:
            await server.start()
        self._server = server
        await self._start_http()
        if s.adopt or s.nodes:
            tls = None
            if s.tls_cert is not None and s.tls_key is not None and s.tls_client_ca is not None:
                tls = NodeTls(s.tls_client_ca, s.tls_cert, s.tls_key)
            self.adopter = Adopter(self.core, s.nodes, auth=s.auth, tls=tls)
            self.adopter.start()
        if self.discovery is None:
            await self._start_discovery()
        elif s.adopt and self.adopter is not None:  # advertised while it stood by
            self.discovery.on_nodes = self.adopter.discovered
        _log.info(
            "coordinator listening on %s tls=%s auth=%s data_dir=%s",
            self.address,
            "mtls" if s.require_client_cert else bool(s.tls_cert),
            s.auth,
            s.data_dir,
        )

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def run(self) -> None:
        """Serve (starting first unless started) until SIGINT or SIGTERM, or until another
        coordinator takes the lead (`deposed`), then stop; a second signal cuts the stop short."""
        if self._server is None:
            await self.start()
        try:
            collect_seldom()
            await until_signalled(done=self.deposed)
        finally:
            await self.stop()

    async def stop(self, grace: float = 5.0) -> None:
        """Stop taking work, then drain: mDNS says goodbye, health turns NOT_SERVING, the
        core refuses new calls, records what nodes run and closes their sessions, then the
        server gives calls in flight `grace` seconds."""
        server, self._server = self._server, None
        if server is None:
            return
        await self._stop_discovery()
        await self._stop_metrics()
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        await self.core.stop()
        await self._stop_http()
        adopter, self.adopter = self.adopter, None
        if adopter is not None:  # after the core closed the sessions it dialled
            await adopter.stop()
        await server.stop(grace)

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
