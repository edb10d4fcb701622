"""The node's own gRPC service: what it is (Info), and tasks run on it directly (Execute, Get,
Cancel) by a caller with the node's token. Health is served beside it, open to probes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1._async import HealthServicer

from shoal._gate import HEALTH_POLICY, HEALTH_SERVICE, OPEN, Gate
from shoal._reflection import serve_reflection
from shoal._server import (
    method_path,
    serve_health,
    server_credentials,
    server_options,
)
from shoal.auth import Principal, Role, hash_secret, secret_matches
from shoal.config import NodeSettings
from shoal.discovery import is_loopback
from shoal.errors import FailedPrecondition, Unauthenticated
from shoal.v1 import node_pb2, node_pb2_grpc

if TYPE_CHECKING:
    from shoal.node.agent import NodeAgent

__all__ = [
    "NodeService",
    "check_service_access",
    "check_tls_files",
    "node_server",
    "service_credentials",
]

_MAX_MESSAGE = 16 << 20
_POLICY = {
    **HEALTH_POLICY,
    # A coordinator attaching the node proves itself inside the stream (see NodeAgent.attach).
    method_path(node_pb2.DESCRIPTOR, "Node", "Attach"): OPEN,
}
"""Everything else (the rest of the Node service) needs the node's token."""


async def node_server(agent: NodeAgent, token: str) -> tuple[grpc.aio.Server, HealthServicer]:
    """The node's gRPC server, not yet listening: its Node service (callers present `token`
    unless auth is off), health (open to probes) and reflection; and its health servicer."""
    s = agent.settings
    gate = Gate(
        _POLICY,
        _authenticator(token) if s.auth else None,
        client_certs=s.service_require_client_cert,
    )
    server = grpc.aio.server(options=server_options(_MAX_MESSAGE), interceptors=[gate])
    node_pb2_grpc.add_NodeServicer_to_server(NodeService(agent), server)
    health = await serve_health(server, tuple(name for name in agent.health() if name))
    # Like the coordinator's, for those who hold the node's token (grpcurl, other languages).
    node_service = node_pb2.DESCRIPTOR.services_by_name["Node"].full_name
    serve_reflection(server, (node_service, HEALTH_SERVICE))
    return server, health


def service_credentials(s: NodeSettings) -> grpc.ServerCredentials | None:
    """The TLS credentials of the node's service; None to serve it in the clear."""
    if s.service_tls and s.tls_cert is not None and s.tls_key is not None:
        return server_credentials(
            s.tls_cert,
            s.tls_key,
            s.tls_ca if s.service_require_client_cert else None,
            s.service_require_client_cert,
        )
    return None


def _authenticator(token: str) -> Callable[[str], Principal]:
    def authenticate(presented: str) -> Principal:
        """Callers of the node's own service present the node's token."""
        if not token or not secret_matches(presented, hash_secret(token)):
            raise Unauthenticated("invalid token")
        return Principal("node-operator", Role.ADMIN)

    return authenticate


def check_tls_files(s: NodeSettings) -> None:
    """TLS settings a node can use, or the mistake at start (not at each reconnect)."""
    if (s.tls_cert is None) != (s.tls_key is None):
        raise FailedPrecondition("TLS needs both tls_cert and tls_key")
    for path in (s.tls_ca, s.tls_cert, s.tls_key):
        if path is not None:
            path.read_bytes()  # OSError naming it


def check_service_access(settings: NodeSettings, token: str) -> None:
    """Refuse (FailedPrecondition) settings that leave the node's service open, or useless.

    Like the coordinator's: auth off is allowed on loopback only, since anyone who reaches the
    service could run code here. A standalone node with auth on needs a token for its callers.
    """
    if not settings.auth and not is_loopback(settings.listen):
        raise FailedPrecondition(
            f"refusing to serve the node's service on {settings.listen} with auth off: anyone"
            " who reaches it could run code here. Turn auth on, or bind 127.0.0.1."
        )
    if settings.service_tls and (settings.tls_cert is None or settings.tls_key is None):
        raise FailedPrecondition("service_tls needs tls_cert and tls_key")
    if settings.service_require_client_cert and (
        not settings.service_tls or settings.tls_ca is None
    ):
        raise FailedPrecondition(
            "service_require_client_cert needs service_tls and tls_ca (the CA of the callers'"
            " certificates)"
        )
    if settings.auth and settings.standalone and not token:
        raise FailedPrecondition(
            "a standalone node needs a token for callers of its service: set token or"
            " token_file (SHOAL_NODE_TOKEN, SHOAL_NODE_TOKEN_FILE), or turn auth off on loopback"
        )


class NodeService(node_pb2_grpc.NodeServicer):
    def __init__(self, agent: NodeAgent) -> None:
        self._agent = agent

    async def Info(
        self, request: node_pb2.InfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> node_pb2.NodeInfo:
        return self._agent.info()

    async def Execute(
        self, request: node_pb2.ExecuteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[node_pb2.ExecuteUpdate]:
        task = self._agent.execute(request.spec, request.task_id)
        async for update in task.follow():
            yield update

    async def Attach(  # type: ignore[override]  # answered through the context
        self,
        request_iterator: AsyncIterator[node_pb2.CoordinatorMessage],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        # Read and written through the context: the session runs the same code both ways.
        await self._agent.link.attach(context, context.peer())

    async def Get(
        self, request: node_pb2.NodeTaskRef, context: grpc.aio.ServicerContext[Any, Any]
    ) -> node_pb2.LocalTask:
        return self._agent.direct.get(request.task_id).snapshot()

    async def Cancel(
        self, request: node_pb2.NodeTaskRef, context: grpc.aio.ServicerContext[Any, Any]
    ) -> node_pb2.LocalTask:
        task = self._agent.cancel_direct(request.task_id)
        await task.ended.wait()
        return task.snapshot()
