"""The node's own gRPC service: what it is (Info)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc

from shoal.v1 import node_pb2, node_pb2_grpc

if TYPE_CHECKING:
    from shoal.node.agent import NodeAgent

__all__ = ["NodeService"]


class NodeService(node_pb2_grpc.NodeServicer):
    def __init__(self, agent: NodeAgent) -> None:
        self._agent = agent

    async def Info(
        self, request: node_pb2.InfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> node_pb2.NodeInfo:
        return self._agent.info()
