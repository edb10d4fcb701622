"""The NodeGateway service: the session of a node, whichever side dialled."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator

import grpc

from shoal._gate import current_principal
from shoal.auth import Principal
from shoal.coordinator.api.context import Ctx
from shoal.coordinator.engine import Coordinator
from shoal.coordinator.sessions import NodeSession
from shoal.errors import InvalidArgument, PermissionDenied
from shoal.handshake import Direction, OwnAddresses
from shoal.v1 import gateway_pb2_grpc, node_pb2

__all__ = ["NodeGatewayService", "run_session"]


class NodeGatewayService(gateway_pb2_grpc.NodeGatewayServicer):
    def __init__(self, core: Coordinator, own: OwnAddresses) -> None:
        self._core = core
        self._own = own  # where nodes reach this coordinator

    async def Identify(self, request: node_pb2.Challenge, context: Ctx) -> node_pb2.Proof:
        # The cheap checks (nonce, token, node) first: a stranger's address is looked up only
        # for a challenge this coordinator could answer at all.
        mac = self._core.prove(
            Direction.JOIN,
            token_id=request.token_id,
            node_id=request.node_id,
            address=request.address,
            nonce=request.nonce,
        )
        # Proven only for an address of this coordinator: a relay that passes on a challenge
        # from a node that dialled it gets no proof for its own address.
        if not await self._own.async_contains(request.address):
            raise PermissionDenied(
                f"{request.address[:300]!r} is not this coordinator's address (nodes that reach"
                " it through NAT or a proxy: list the address in its reachable_at)"
            )
        return node_pb2.Proof(mac=mac)

    async def Connect(
        self, request_iterator: AsyncIterator[node_pb2.NodeMessage], context: Ctx
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
