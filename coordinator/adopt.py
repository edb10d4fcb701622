"""Adopt mode: the coordinator dials nodes (Node.Attach) and runs their sessions itself.

For nodes it can reach but that cannot reach it (NAT the other way, a firewall). A node that
dials in itself is not dialled too, and a node takes one session at a time, so each node has
one session whichever side dialled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from shoal._channel import open_channel
from shoal.auth import ANONYMOUS, Principal, Role
from shoal.coordinator.api import run_session
from shoal.coordinator.engine import Coordinator
from shoal.errors import PermissionDenied, ShoalError
from shoal.handshake import Direction
from shoal.v1 import node_pb2, node_pb2_grpc

__all__ = ["Adopter", "NodeTls"]

_log = logging.getLogger("shoal.coordinator")
_MAX_MESSAGE = 16 << 20


@dataclass(frozen=True)
class NodeTls:
    """How an adopting coordinator dials nodes with TLS: the CA of their certificates, and its
    own certificate, which nodes that require one verify (mTLS)."""

    ca: Path
    cert: Path
    key: Path


class _AttachFailed(Exception):
    """The node could not be reached, or its session did not start."""


@dataclass(eq=False)
class _Target:
    address: str  # host:port of the node's service
    node_id: str = ""  # known once it said Hello (or from its advertisement)
    advertised_id: str = ""  # the node id its mDNS advertisement names ("" for `nodes`)
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class Adopter:
    """Keeps a session with every node at `nodes` and every node `discovered` (by mDNS).

    `start()`, `discovered(...)` whenever the advertised nodes change, then `stop()`.
    """

    def __init__(
        self,
        core: Coordinator,
        nodes: list[str],
        *,
        auth: bool,
        tls: NodeTls | None = None,
        reconnect_max: float = 5.0,
    ) -> None:
        self._core = core
        self._tls = tls
        self._static = list(dict.fromkeys(nodes))
        self._auth = auth
        self._wait = wait_exponential_jitter(initial=0.05, jitter=0.05, max=reconnect_max)
        self._targets: dict[str, _Target] = {}  # by address
        self._running = False

    def start(self) -> None:
        self._running = True
        for address in self._static:
            self._follow(_Target(address))

    def discovered(self, nodes: Mapping[str, str]) -> None:
        """The nodes advertised now, node id -> address: dial new ones, drop those gone."""
        if not self._running:
            return
        wanted = {address: node_id for node_id, address in nodes.items()}
        for address in [a for a in self._targets if a not in wanted and a not in self._static]:
            target = self._targets.pop(address)
            if target.task is not None:
                target.task.cancel()
        for address, node_id in wanted.items():
            if address in self._targets:
                target = self._targets[address]
                target.node_id = target.node_id or node_id
                target.advertised_id = target.advertised_id or node_id
            else:
                self._follow(_Target(address, node_id, node_id))

    async def stop(self) -> None:
        self._running = False
        tasks = [t.task for t in self._targets.values() if t.task is not None]
        self._targets.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _follow(self, target: _Target) -> None:
        self._targets[target.address] = target
        target.task = asyncio.create_task(self._keep(target), name=f"shoal-adopt-{target.address}")

    async def _keep(self, target: _Target) -> None:
        """Hold a session with the node while it has none of its own; redial with backoff."""
        while True:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(_AttachFailed), wait=self._wait, reraise=True
            ):
                with attempt:
                    # It dialled in itself: dial once that session ends.
                    while (own := self._core.session(target.node_id)) is not None:
                        await own.ended.wait()
                    await self._session(target)

    async def _session(self, target: _Target) -> None:
        tls = self._tls
        channel = open_channel(
            target.address,
            max_message_bytes=_MAX_MESSAGE,
            tls_ca=tls.ca if tls else None,
            tls_cert=tls.cert if tls else None,
            tls_key=tls.key if tls else None,
        )
        try:
            call = node_pb2_grpc.NodeStub(channel).Attach()
            try:
                await self._attach(target, call)
            except grpc.aio.AioRpcError as err:
                _log.warning(
                    "cannot attach node at %s: %s %s",
                    target.address,
                    err.code().name,
                    err.details(),
                )
                raise _AttachFailed(err.details()) from err
            except ShoalError as err:
                _log.warning("cannot attach node at %s: %s", target.address, err)
                raise _AttachFailed(str(err)) from err
            finally:
                call.cancel()
        finally:
            await channel.close()

    async def _attach(
        self,
        target: _Target,
        call: grpc.aio.StreamStreamCall[node_pb2.CoordinatorMessage, node_pb2.NodeMessage],
    ) -> None:
        async def incoming() -> AsyncIterator[node_pb2.NodeMessage]:
            while (message := await call.read()) is not grpc.aio.EOF:
                assert isinstance(message, node_pb2.NodeMessage)
                yield message

        messages = incoming()
        first = await anext(messages, None)
        challenge: node_pb2.Challenge | None = None
        if first is not None and first.WhichOneof("msg") == "challenge":
            challenge = first.challenge
            await call.write(node_pb2.CoordinatorMessage(proof=self._prove(target, challenge)))
            first = await anext(messages, None)
        if first is None or first.WhichOneof("msg") != "hello":
            raise _AttachFailed("the node sent no hello")
        hello = first.hello
        principal = self._principal(hello)
        if challenge is not None and (
            principal.token_id != challenge.token_id or hello.info.node_id != challenge.node_id
        ):
            raise PermissionDenied(
                "the node's hello names another token or node than its challenge"
            )
        target.node_id = hello.info.node_id
        session = run_session(self._core, hello, messages, target.address, principal, adopted=True)
        async with contextlib.aclosing(session):
            async for message in session:
                await call.write(message)

    def _prove(self, target: _Target, challenge: node_pb2.Challenge) -> node_pb2.Proof:
        """Prove to the node that this coordinator issued its token, bound to the address
        dialled: the node refuses a proof for an address not its own (a relay's). Only for the
        node that was meant: the one its advertisement names, when it came by mDNS."""
        if target.advertised_id and challenge.node_id != target.advertised_id:
            raise PermissionDenied(
                f"the node at {target.address} says it is {challenge.node_id!r}, but"
                f" {target.advertised_id!r} was advertised there"
            )
        mac = self._core.tokens.prove(
            Direction.ATTACH,
            token_id=challenge.token_id,
            node_id=challenge.node_id,
            address=target.address,
            nonce=challenge.nonce,
        )
        return node_pb2.Proof(mac=mac, address=target.address)

    def _principal(self, hello: node_pb2.Hello) -> Principal:
        """Who the node is: the token in its Hello, checked as NodeGateway.Connect checks it."""
        if not self._auth:
            return ANONYMOUS
        principal = self._core.tokens.authenticate(hello.token)
        if principal.role not in (Role.NODE, Role.ADMIN):
            raise PermissionDenied(f"{principal.name} ({principal.role}) is not a node's token")
        return principal
