"""The node's own gRPC service: what it is (Info), and tasks run on it directly (Execute, Get,
Cancel) by a caller with the node's token. Health is served beside it, open to probes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from shoal.config import NodeSettings
from shoal.discovery import is_loopback
from shoal.errors import FailedPrecondition
from shoal.v1 import node_pb2, node_pb2_grpc

if TYPE_CHECKING:
    from shoal.node.agent import NodeAgent

__all__ = ["NodeService", "check_service_access"]


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
