"""The coordinator process: the gRPC server around the core, with health and reflection."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Self

import grpc
from grpc_health.v1._async import HealthServicer

from shoal._reflection import serve_reflection
from shoal._server import (
    HEALTH_POLICY,
    HEALTH_SERVICE,
    OPEN,
    Gate,
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
from shoal.coordinator.store import SqliteStore
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

_log = logging.getLogger("shoal.coordinator")

SERVICE_NAMES = (
    tasks_pb2.DESCRIPTOR.services_by_name["Tasks"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
    gateway_pb2.DESCRIPTOR.services_by_name["NodeGateway"].full_name,
    locks_pb2.DESCRIPTOR.services_by_name["Locks"].full_name,
)

_SUBMIT = frozenset({Role.SUBMITTER})
_READ = frozenset({Role.SUBMITTER, Role.READER})
POLICY: dict[str, frozenset[Role]] = {
    **{method_path(tasks_pb2.DESCRIPTOR, "Tasks", m): _SUBMIT for m in ("Submit", "SubmitBatch")},
    method_path(tasks_pb2.DESCRIPTOR, "Tasks", "Cancel"): _SUBMIT,
    **{method_path(tasks_pb2.DESCRIPTOR, "Tasks", m): _READ for m in ("Get", "Wait", "List")},
    method_path(tasks_pb2.DESCRIPTOR, "Tasks", "Watch"): _READ,
    method_path(admin_pb2.DESCRIPTOR, "Admin", "ListNodes"): frozenset({Role.READER}),
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
        self.core = Coordinator(
            SqliteStore(settings.data_dir / STORE_FILE, synchronous=settings.synchronous),
            settings,
        )
        self._server: grpc.aio.Server | None = None
        self._health: HealthServicer | None = None
        self._metrics: MetricsServer | None = None
        self.discovery: CoordinatorDiscovery | None = None
        self.adopter: Adopter | None = None
        self.port = 0
        self._own = OwnAddresses(0, settings.reachable_at)  # port: once it listens

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

    def _check_settings(self) -> None:
        s = self.settings
        if not s.auth and not is_loopback(s.listen):
            raise FailedPrecondition(
                f"refusing to listen on {s.listen} with auth off: anyone who reaches it could"
                " run code here. Turn auth on, or bind 127.0.0.1."
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
        if s.tls_cert is None and not is_loopback(s.listen):
            _log.warning("listening on %s without TLS: tokens cross the network in clear", s.listen)

    async def start(self) -> None:
        self._check_settings()
        # Ports first: one another process holds ends the start at once, not after recovery.
        server = await self._listen()
        try:
            await self.core.start()
        except BaseException:
            await self._stop_metrics()
            await server.stop(None)
            raise
        try:
            await self._serve(server)
        except BaseException:
            await self._stop_metrics()
            await self.core.stop()
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
        )
        options = server_options(
            s.max_message_bytes,
            handshake_timeout=s.handshake_timeout,
            idle_timeout=s.idle_timeout,
            max_connections=s.max_connections,
            max_streams=s.max_streams,
        )
        server = grpc.aio.server(options=options, interceptors=[gate])
        tasks_pb2_grpc.add_TasksServicer_to_server(TasksService(self.core), server)
        admin_pb2_grpc.add_AdminServicer_to_server(AdminService(self.core), server)
        gateway_pb2_grpc.add_NodeGatewayServicer_to_server(
            NodeGatewayService(self.core, self._own), server
        )
        locks_pb2_grpc.add_LocksServicer_to_server(LocksService(self.core), server)
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

    async def _stop_metrics(self) -> None:
        metrics, self._metrics = self._metrics, None
        if metrics is not None:
            await metrics.stop()

    async def _serve(self, server: grpc.aio.Server) -> None:
        s = self.settings
        if s.auth and await self.core.tokens.bootstrap_admin(self.admin_token_path):
            _log.info("wrote a new admin token to %s", self.admin_token_path)
        await server.start()
        self._server = server
        if s.adopt or s.nodes:
            tls = None
            if s.tls_cert is not None and s.tls_key is not None and s.tls_client_ca is not None:
                tls = NodeTls(s.tls_client_ca, s.tls_cert, s.tls_key)
            self.adopter = Adopter(self.core, s.nodes, auth=s.auth, tls=tls)
            self.adopter.start()
        advertise = advertises(s.advertise, s.listen)
        if advertise or s.adopt:  # an adopting coordinator browses for nodes to dial
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
        """Serve (starting first unless started) until SIGINT or SIGTERM, then stop; a second
        signal cuts the stop short."""
        if self._server is None:
            await self.start()
        try:
            collect_seldom()
            await until_signalled()
        finally:
            await self.stop()

    async def stop(self, grace: float = 5.0) -> None:
        """Stop taking work, then drain: mDNS says goodbye, health turns NOT_SERVING, the
        core refuses new calls, records what nodes run and closes their sessions, then the
        server gives calls in flight `grace` seconds."""
        server, self._server = self._server, None
        if server is None:
            return
        discovery, self.discovery = self.discovery, None
        if discovery is not None:
            # Nodes hear the goodbye and look for their coordinator again.
            self.core.discovered = dict
            await discovery.async_stop()
        await self._stop_metrics()
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        await self.core.stop()
        adopter, self.adopter = self.adopter, None
        if adopter is not None:  # after the core closed the sessions it dialled
            await adopter.stop()
        await server.stop(grace)

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
