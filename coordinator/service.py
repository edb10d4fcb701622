"""gRPC servicers of the coordinator: decode, call the core, encode.

The Gate (shoal._server) has already authenticated the caller, checked its role and mapped
errors to statuses; `current_principal()` is who is calling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import timedelta
from typing import Any, TypeAlias

import grpc

from shoal._channel import CLIENT_KEY
from shoal._server import current_principal
from shoal.auth import Principal, Role
from shoal.coordinator.core import SHUTTING_DOWN, Coordinator
from shoal.coordinator.sessions import NodeSession
from shoal.coordinator.store import TokenRow
from shoal.errors import InvalidArgument, PermissionDenied, Unavailable
from shoal.handshake import Direction, OwnAddresses
from shoal.specs import duration, timestamp
from shoal.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    gateway_pb2_grpc,
    locks_pb2,
    locks_pb2_grpc,
    node_pb2,
    task_pb2,
    tasks_pb2,
    tasks_pb2_grpc,
)

__all__ = ["AdminService", "LocksService", "NodeGatewayService", "TasksService"]

_log = logging.getLogger("shoal.coordinator")
_DEFAULT_DRAIN_GRACE = timedelta(seconds=30)
_Ctx: TypeAlias = Any  # grpc.aio.ServicerContext (grpcio ships no type hints)

_ROLES = {
    admin_pb2.ROLE_ADMIN: Role.ADMIN,
    admin_pb2.ROLE_SUBMITTER: Role.SUBMITTER,
    admin_pb2.ROLE_READER: Role.READER,
    admin_pb2.ROLE_NODE: Role.NODE,
}
_ROLE_ENUMS = {role: value for value, role in _ROLES.items()}


def _client_of(context: _Ctx) -> str:
    """Who calls, for a place in line: the client's own name if it gives one, else its peer."""
    for key, value in context.invocation_metadata() or ():
        if key == CLIENT_KEY and isinstance(value, str):
            return value[:64]
    return str(context.peer())


class TasksService(tasks_pb2_grpc.TasksServicer):
    def __init__(self, core: Coordinator) -> None:
        self._core = core

    async def Submit(
        self, request: tasks_pb2.SubmitRequest, context: _Ctx
    ) -> tasks_pb2.SubmitResponse:
        by = current_principal()
        (done,) = await self._core.submit(
            [request.spec],
            single=True,
            by=by,
            request_id=request.request_id,
            client=_client_of(context),
        )
        return tasks_pb2.SubmitResponse(
            task=await self._core.get(done.task_id, by=by), created=done.created
        )

    async def SubmitBatch(
        self, request: tasks_pb2.SubmitBatchRequest, context: _Ctx
    ) -> tasks_pb2.SubmitBatchResponse:
        done = await self._core.submit(
            request.specs,
            by=current_principal(),
            request_id=request.request_id,
            client=_client_of(context),
        )
        seqs = [d.seq for d in done if d.created]
        return tasks_pb2.SubmitBatchResponse(
            task_ids=[d.task_id for d in done],
            created=[d.created for d in done],
            first_seq=min(seqs) if seqs else 0,
        )

    async def Get(self, request: tasks_pb2.GetRequest, context: _Ctx) -> task_pb2.Task:
        return await self._core.get(request.task_id, by=current_principal())

    async def Wait(self, request: tasks_pb2.WaitRequest, context: _Ctx) -> task_pb2.Task:
        timeout = duration(request.timeout, "timeout") if request.HasField("timeout") else None
        return await self._core.wait(request.task_id, timeout, by=current_principal())

    async def Cancel(self, request: tasks_pb2.CancelRequest, context: _Ctx) -> task_pb2.Task:
        return await self._core.cancel(request.task_id, by=current_principal())

    async def List(self, request: tasks_pb2.ListRequest, context: _Ctx) -> tasks_pb2.ListResponse:
        tasks, token = await self._core.list_tasks(
            states=list(request.states),
            tenant=request.tenant,
            limit=request.limit,
            page_token=request.page_token,
            by=current_principal(),
        )
        return tasks_pb2.ListResponse(tasks=tasks, next_page_token=token)

    # It writes through the context rather than yielding: a write can then be given up.
    async def Watch(self, request: tasks_pb2.WatchRequest, context: _Ctx) -> None:  # type: ignore[override]
        since = request.since if request.HasField("since") else None
        async for cursor, events in self._core.watch(
            since=since,
            task_ids=list(request.task_ids),
            output=request.output,
            tenant=request.tenant,
            states=list(request.states),
            by=current_principal(),
        ):
            await self._send(context, tasks_pb2.WatchResponse(events=events, cursor=cursor))

    async def _send(self, context: _Ctx, response: tasks_pb2.WatchResponse) -> None:
        """Write a watch's response; a watcher that reads slower than events come is cut once
        what it has yet to read leaves the in-memory log, so that what it holds stays bounded.
        It resumes from its cursor (the SDK's watch does so by itself)."""
        events = self._core.events
        if response.cursor < events.oldest_seq - 1:  # replaying from the store: nothing to lose
            await context.write(response)
            return
        write = asyncio.ensure_future(context.write(response))
        dropped = asyncio.ensure_future(events.wait_dropped(response.cursor))
        try:
            await asyncio.wait((write, dropped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            dropped.cancel()
            cut = not write.done()
            if cut:
                write.cancel()
            # A write given up (or the call gone meanwhile) may still end in the call's error.
            write.add_done_callback(_retrieved)
        if cut and events.closed:  # a watcher that does not read holds no shutdown up
            raise Unavailable(SHUTTING_DOWN)
        if cut:
            self._core.watchers_cut += 1
            raise Unavailable(
                "this watcher fell behind: events it had yet to read left the coordinator's"
                " memory; watch again from the last cursor it received"
            )
        write.result()


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Take a finished task's outcome, so that an error nobody awaits is not logged."""
    if not task.cancelled():
        task.exception()


def _token_info(row: TokenRow) -> admin_pb2.TokenInfo:
    return admin_pb2.TokenInfo(
        id=row.id,
        name=row.name,
        role=_ROLE_ENUMS[Role(row.role)],
        tenant=row.tenant,
        node_id=row.node_id,
        executors=row.executors,
        labels=row.labels,
        created_at=timestamp(row.created_at),
        expires_at=timestamp(row.expires_at),
        revoked_at=timestamp(row.revoked_at),
        created_by=row.created_by,
    )


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, core: Coordinator) -> None:
        self._core = core

    async def ListNodes(
        self, request: admin_pb2.ListNodesRequest, context: _Ctx
    ) -> admin_pb2.ListNodesResponse:
        return admin_pb2.ListNodesResponse(nodes=self._core.nodes())

    async def CreateToken(
        self, request: admin_pb2.CreateTokenRequest, context: _Ctx
    ) -> admin_pb2.CreateTokenResponse:
        role = _ROLES.get(request.role)
        if role is None:
            raise InvalidArgument("role must be one of admin, submitter, reader, node")
        made = await self._core.tokens.create(
            name=request.name,
            role=role,
            tenant=request.tenant,
            node_id=request.node_id,
            executors=list(request.executors),
            labels=dict(request.labels),
            ttl=duration(request.ttl, "ttl", positive=True) if request.HasField("ttl") else None,
            created_by=current_principal().name,
        )
        _log.info("token %r (%s) created by %s", made.row.name, role, made.row.created_by)
        return admin_pb2.CreateTokenResponse(info=_token_info(made.row), token=made.token)

    async def ListTokens(
        self, request: admin_pb2.ListTokensRequest, context: _Ctx
    ) -> admin_pb2.ListTokensResponse:
        rows = self._core.tokens.all() if request.include_revoked else self._core.tokens.active()
        return admin_pb2.ListTokensResponse(tokens=[_token_info(r) for r in rows])

    async def RevokeToken(
        self, request: admin_pb2.RevokeTokenRequest, context: _Ctx
    ) -> admin_pb2.TokenInfo:
        row = await self._core.revoke_token(request.token)
        _log.info("token %r revoked by %s", row.name, current_principal().name)
        return _token_info(row)

    async def CreateSchedule(
        self, request: admin_pb2.Schedule, context: _Ctx
    ) -> admin_pb2.Schedule:
        return await self._core.create_schedule(request, by=current_principal())

    async def ListSchedules(
        self, request: admin_pb2.ListSchedulesRequest, context: _Ctx
    ) -> admin_pb2.ListSchedulesResponse:
        return admin_pb2.ListSchedulesResponse(schedules=self._core.schedules())

    async def DeleteSchedule(
        self, request: admin_pb2.ScheduleRef, context: _Ctx
    ) -> admin_pb2.Schedule:
        return await self._core.delete_schedule(request.name)

    async def PauseSchedule(
        self, request: admin_pb2.ScheduleRef, context: _Ctx
    ) -> admin_pb2.Schedule:
        return await self._core.pause_schedule(request.name, paused=True)

    async def ResumeSchedule(
        self, request: admin_pb2.ScheduleRef, context: _Ctx
    ) -> admin_pb2.Schedule:
        return await self._core.pause_schedule(request.name, paused=False)

    async def Drain(self, request: admin_pb2.DrainRequest, context: _Ctx) -> admin_pb2.NodeStatus:
        grace = (
            duration(request.grace, "grace") if request.HasField("grace") else _DEFAULT_DRAIN_GRACE
        )
        _log.info("node %s drained by %s", request.node_id, current_principal().name)
        return self._core.drain(request.node_id, grace, leave=request.leave)

    async def Undrain(self, request: admin_pb2.DrainRequest, context: _Ctx) -> admin_pb2.NodeStatus:
        _log.info("node %s undrained by %s", request.node_id, current_principal().name)
        return self._core.undrain(request.node_id)

    async def SetQuota(self, request: admin_pb2.Quota, context: _Ctx) -> admin_pb2.Quota:
        _log.info("quota on %r set by %s", request.key, current_principal().name)
        return await self._core.set_quota(request)

    async def ListQuotas(
        self, request: admin_pb2.ListQuotasRequest, context: _Ctx
    ) -> admin_pb2.ListQuotasResponse:
        return admin_pb2.ListQuotasResponse(quotas=self._core.quotas.quotas())

    async def DeleteQuota(self, request: admin_pb2.QuotaRef, context: _Ctx) -> admin_pb2.Quota:
        _log.info("quota on %r deleted by %s", request.key, current_principal().name)
        return await self._core.delete_quota(request.key)

    async def GetUsage(
        self, request: admin_pb2.UsageRequest, context: _Ctx
    ) -> admin_pb2.UsageResponse:
        return admin_pb2.UsageResponse(usage=self._core.quotas.usage(request.key))


def _ttl(request: locks_pb2.AcquireRequest | locks_pb2.RenewRequest) -> timedelta:
    if not request.HasField("ttl"):
        raise InvalidArgument("ttl is required: a lease ends by itself")
    return duration(request.ttl, "ttl", positive=True)


class LocksService(locks_pb2_grpc.LocksServicer):
    def __init__(self, core: Coordinator) -> None:
        self._core = core

    async def Acquire(self, request: locks_pb2.AcquireRequest, context: _Ctx) -> locks_pb2.Lease:
        wait = duration(request.wait, "wait") if request.HasField("wait") else timedelta(0)
        return await self._core.acquire_lock(
            request.name, _ttl(request), wait, shared=request.shared, by=current_principal()
        )

    async def Renew(self, request: locks_pb2.RenewRequest, context: _Ctx) -> locks_pb2.Lease:
        return await self._core.renew_lock(
            request.name, request.token, _ttl(request), by=current_principal()
        )

    async def Release(self, request: locks_pb2.ReleaseRequest, context: _Ctx) -> locks_pb2.Lease:
        return await self._core.release_lock(request.name, request.token, by=current_principal())


class NodeGatewayService(gateway_pb2_grpc.NodeGatewayServicer):
    def __init__(self, core: Coordinator, own: OwnAddresses) -> None:
        self._core = core
        self._own = own  # where nodes reach this coordinator

    async def Identify(self, request: node_pb2.Challenge, context: _Ctx) -> node_pb2.Proof:
        # Proven only for an address of this coordinator: a relay that passes on a challenge
        # from a node that dialled it gets no proof for its own address.
        if not await self._own.async_contains(request.address):
            raise PermissionDenied(
                f"{request.address[:300]!r} is not this coordinator's address (nodes that reach"
                " it through NAT or a proxy: list the address in its reachable_at)"
            )
        mac = self._core.tokens.prove(
            Direction.JOIN,
            token_id=request.token_id,
            node_id=request.node_id,
            address=request.address,
            nonce=request.nonce,
        )
        return node_pb2.Proof(mac=mac)

    async def Connect(
        self, request_iterator: AsyncIterator[node_pb2.NodeMessage], context: _Ctx
    ) -> AsyncIterator[node_pb2.CoordinatorMessage]:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("msg") != "hello":
            raise InvalidArgument("a node session starts with hello")
        async for message in run_session(
            self._core, first.hello, request_iterator, context.peer(), current_principal()
        ):
            yield message


async def run_session(
    core: Coordinator,
    hello: node_pb2.Hello,
    incoming: AsyncIterator[node_pb2.NodeMessage],
    peer: str,
    principal: Principal,
    *,
    adopted: bool = False,
) -> AsyncGenerator[node_pb2.CoordinatorMessage, None]:
    """A node's session after its Hello, whichever side dialled: Welcome, then what the core
    sends it, while what the node sends is applied; it ends when either side closes."""
    session = core.attach(hello, peer, by=principal, adopted=adopted)
    reader = asyncio.create_task(_read(core, session, incoming))
    try:
        yield core.welcome(session)
        while (messages := await session.outgoing()) is not None:
            for message in messages:
                yield message
        if reader.done() and not reader.cancelled():
            reader.result()  # a bad message ends the session with its status
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
        core.detach(session)


async def _read(
    core: Coordinator, session: NodeSession, messages: AsyncIterator[node_pb2.NodeMessage]
) -> None:
    try:
        async for message in messages:
            # Rate-limited: a flooding node is read slowly, and flow control pushes back.
            delay = session.bucket.take()
            if delay:
                session.throttled += 1
                await asyncio.sleep(delay)
            core.on_message(session, message)
    except grpc.aio.AioRpcError:
        pass
    finally:
        # The node closed its side (or broke): end the session now, not at lease expiry.
        core.detach(session)
