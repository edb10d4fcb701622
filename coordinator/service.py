"""gRPC servicers of the coordinator: decode, call the core, encode."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc

from shoal._status import rpc_errors
from shoal.coordinator.core import Coordinator
from shoal.errors import InvalidArgument
from shoal.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    task_pb2,
    tasks_pb2,
    tasks_pb2_grpc,
)

__all__ = ["AdminService", "NodeGatewayService", "TasksService"]

_log = logging.getLogger("shoal.coordinator")
_Ctx: TypeAlias = Any  # grpc.aio.ServicerContext (grpcio ships no type hints)


class TasksService(tasks_pb2_grpc.TasksServicer):
    def __init__(self, core: Coordinator) -> None:
        self._core = core

    @rpc_errors
    async def Submit(
        self, request: tasks_pb2.SubmitRequest, context: _Ctx
    ) -> tasks_pb2.SubmitResponse:
        (done,) = await self._core.submit([request.spec], single=True)
        return tasks_pb2.SubmitResponse(
            task=await self._core.get(done.task_id), created=done.created
        )

    @rpc_errors
    async def SubmitBatch(
        self, request: tasks_pb2.SubmitBatchRequest, context: _Ctx
    ) -> tasks_pb2.SubmitBatchResponse:
        done = await self._core.submit(request.specs)
        seqs = [d.seq for d in done if d.created]
        return tasks_pb2.SubmitBatchResponse(
            task_ids=[d.task_id for d in done],
            created=[d.created for d in done],
            first_seq=min(seqs) if seqs else 0,
        )

    @rpc_errors
    async def Get(self, request: tasks_pb2.GetRequest, context: _Ctx) -> task_pb2.Task:
        return await self._core.get(request.task_id)

    @rpc_errors
    async def Wait(self, request: tasks_pb2.WaitRequest, context: _Ctx) -> task_pb2.Task:
        timeout = request.timeout.ToTimedelta() if request.HasField("timeout") else None
        if timeout is not None and timeout.total_seconds() < 0:
            raise InvalidArgument("timeout must not be negative")
        return await self._core.wait(request.task_id, timeout)

    @rpc_errors
    async def Cancel(self, request: tasks_pb2.CancelRequest, context: _Ctx) -> task_pb2.Task:
        return await self._core.cancel(request.task_id)

    @rpc_errors
    async def List(self, request: tasks_pb2.ListRequest, context: _Ctx) -> tasks_pb2.ListResponse:
        tasks, token = await self._core.list_tasks(
            states=list(request.states),
            tenant=request.tenant,
            limit=request.limit,
            page_token=request.page_token,
        )
        return tasks_pb2.ListResponse(tasks=tasks, next_page_token=token)

    @rpc_errors
    async def Watch(
        self, request: tasks_pb2.WatchRequest, context: _Ctx
    ) -> AsyncIterator[tasks_pb2.WatchResponse]:
        since = request.since if request.HasField("since") else None
        async for cursor, events in self._core.watch(
            since=since,
            task_ids=list(request.task_ids),
            output=request.output,
            tenant=request.tenant,
        ):
            yield tasks_pb2.WatchResponse(events=events, cursor=cursor)


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, core: Coordinator) -> None:
        self._core = core

    @rpc_errors
    async def ListNodes(
        self, request: admin_pb2.ListNodesRequest, context: _Ctx
    ) -> admin_pb2.ListNodesResponse:
        return admin_pb2.ListNodesResponse(nodes=self._core.nodes())


class NodeGatewayService(gateway_pb2_grpc.NodeGatewayServicer):
    def __init__(self, core: Coordinator) -> None:
        self._core = core

    @rpc_errors
    async def Connect(
        self, request_iterator: AsyncIterator[gateway_pb2.NodeMessage], context: _Ctx
    ) -> AsyncIterator[gateway_pb2.CoordinatorMessage]:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("msg") != "hello":
            raise InvalidArgument("a node session starts with hello")
        session = self._core.attach(first.hello, context.peer())
        reader = asyncio.create_task(self._read(session, request_iterator))
        try:
            yield self._core.welcome(session)
            while (messages := await session.outgoing()) is not None:
                for message in messages:
                    yield message
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            self._core.detach(session)

    async def _read(self, session: Any, messages: AsyncIterator[gateway_pb2.NodeMessage]) -> None:
        try:
            async for message in messages:
                self._core.on_message(session, message)
        except grpc.aio.AioRpcError:
            pass
        except Exception:
            _log.exception("node=%s bad message; closing its session", session.node_id)
        finally:
            # The node closed its side (or broke): end the session now, not at lease expiry.
            self._core.detach(session)
