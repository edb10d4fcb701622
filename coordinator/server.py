"""The coordinator process: the gRPC server around the core, with health and reflection."""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from shoal._server import grpc_options, serve_health
from shoal.config import CoordinatorSettings
from shoal.coordinator.core import Coordinator, CoreOptions
from shoal.coordinator.service import AdminService, NodeGatewayService, TasksService
from shoal.coordinator.store import SqliteStore
from shoal.coordinator.validation import Limits
from shoal.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    tasks_pb2,
    tasks_pb2_grpc,
)

__all__ = ["SERVICE_NAMES", "CoordinatorServer"]

_log = logging.getLogger("shoal.coordinator")

SERVICE_NAMES = (
    tasks_pb2.DESCRIPTOR.services_by_name["Tasks"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
    gateway_pb2.DESCRIPTOR.services_by_name["NodeGateway"].full_name,
)


class CoordinatorServer:
    """Runs the core behind a gRPC server; `start`, then `stop` (idempotent)."""

    def __init__(self, settings: CoordinatorSettings) -> None:
        self.settings = settings
        self.core = Coordinator(
            SqliteStore(settings.data_dir / "shoal.db", synchronous=settings.synchronous),
            CoreOptions(
                limits=Limits(max_spec_bytes=settings.max_spec_bytes, max_batch=settings.max_batch),
                heartbeat_interval=settings.heartbeat_interval,
                lease=settings.lease,
                event_capacity=settings.event_capacity,
                finished_cache=settings.finished_cache,
            ),
        )
        self._server: grpc.aio.Server | None = None
        self._health: HealthServicer | None = None
        self.port = 0

    @property
    def address(self) -> str:
        host = self.settings.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def start(self) -> None:
        await self.core.start()
        server = grpc.aio.server(options=grpc_options(self.settings.max_message_bytes))
        tasks_pb2_grpc.add_TasksServicer_to_server(TasksService(self.core), server)
        admin_pb2_grpc.add_AdminServicer_to_server(AdminService(self.core), server)
        gateway_pb2_grpc.add_NodeGatewayServicer_to_server(NodeGatewayService(self.core), server)
        self._health = await serve_health(server, SERVICE_NAMES)
        reflection.enable_server_reflection(
            (
                *SERVICE_NAMES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        self.port = server.add_insecure_port(self.settings.listen)
        if not self.port:
            await self.core.stop()
            raise OSError(f"cannot listen on {self.settings.listen}")
        await server.start()
        self._server = server
        _log.info("coordinator listening on %s data_dir=%s", self.address, self.settings.data_dir)

    async def stop(self, grace: float = 5.0) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        await self.core.stop()
        await server.stop(grace)

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
