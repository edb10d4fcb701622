"""A node's session with its coordinator: one at a time, whichever side dialled
(NodeGateway.Connect, or Node.Attach by an adopting coordinator); the lease it holds through
it. The updates it carries wait in the node's outbox (outbox.py), which outlives sessions.

Liveness: the node heartbeats every interval the coordinator names, numbering each; the
coordinator answers with the number, renewing the lease from the moment that heartbeat was
sent. So the node's view of its lease always ends before the coordinator's, and a node that
cannot renew it (partitioned, paused, coordinator gone) stops its own tasks first: by then
they are being dispatched again elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Protocol

import grpc
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from shoal._channel import bearer, open_channel
from shoal._leader import LeaderChannel
from shoal.config import NodeSettings
from shoal.errors import FailedPrecondition, PermissionDenied, ShoalError, Unauthenticated
from shoal.handshake import OwnAddresses
from shoal.node.discovery import NodeDiscovery
from shoal.node.outbox import Outbox
from shoal.node.proofs import Unproven, challenge, identify
from shoal.v1 import gateway_pb2_grpc, node_pb2

__all__ = ["CoordinatorLink", "SessionHost", "SessionStream"]

_log = logging.getLogger("shoal.node")
_MAX_MESSAGE = 16 << 20
_IDENTIFY_TIMEOUT = 5.0  # seconds a coordinator the node found has to prove itself
_FIND_LEADER = 2.0  # seconds a dial waits to learn which of several coordinators leads


class SessionStream(Protocol):
    """Either end of a session's stream: the call a node dialled, or the context of an Attach."""

    async def read(self) -> Any: ...

    async def write(self, message: Any, /) -> None: ...


class SessionHost(Protocol):
    """What the session needs of its node."""

    node_id: str
    settings: NodeSettings
    discovery: NodeDiscovery
    own_addresses: OwnAddresses  # where its service is reached: a coordinator must dial one

    @property
    def token(self) -> str:
        """The node's token ('' without one)."""
        ...

    def info(self) -> node_pb2.NodeInfo: ...

    def running_attempts(self) -> list[node_pb2.RunningAttempt]:
        """The coordinator's attempts it still runs (for Hello)."""
        ...

    def heartbeat(self) -> node_pb2.Heartbeat:
        """What the next heartbeat says (its number is the session's)."""
        ...

    def assigned(self, assignment: node_pb2.Assignment) -> None: ...

    def cancelled(self, attempt: node_pb2.RunningAttempt) -> None: ...

    def drain(self, grace: float, *, leave: bool = False) -> None: ...

    def undrain(self) -> None: ...

    def fence(self) -> None:
        """Its lease lapsed: stop every attempt of the coordinator (they run elsewhere now)."""
        ...

    def refused(self, err: ShoalError) -> None:
        """Its coordinator refused it for good: dialling again cannot help."""
        ...


class _SessionFailed(Exception):
    """The session could not be established (or broke before Welcome); `code`: the status
    the coordinator answered with, if it did."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


# What a node refused for these reasons must change: they hold until someone changes it.
_REFUSALS: dict[grpc.StatusCode, tuple[type[ShoalError], str]] = {
    grpc.StatusCode.PERMISSION_DENIED: (
        PermissionDenied,
        "make the node match its token and certificate: its --node-id, and --executor and"
        " --label for each executor and label the token allows (shoal token create NODE_ID"
        " --role node --executor ... --label ...); a certificate for its node id (shoal certs"
        " issue NODE_ID)",
    ),
    grpc.StatusCode.UNAUTHENTICATED: (
        Unauthenticated,
        "give the node a valid node token of this coordinator (shoal token create NODE_ID"
        " --role node; then --token-file FILE or SHOAL_NODE_TOKEN)",
    ),
}


def _seconds(d: object) -> float:
    return d.ToNanoseconds() / 1e9  # type: ignore[attr-defined, no-any-return]


class CoordinatorLink:
    """Keeps the node's session: `start(dial=...)`, `attach(...)` for an adopting coordinator,
    `push` updates; `stop()`."""

    def __init__(self, host: SessionHost) -> None:
        self._host = host
        self.connected = asyncio.Event()  # set while a session is up
        self.outbox = Outbox()
        self.push = (
            self.outbox.push
        )  # send an update with the next batch, in this session or the next
        self.output_room = self.outbox.output_room
        self.flushed = self.outbox.flushed  # set while every update was written to a stream
        # The lease: its length (from Welcome), when it ends (monotonic; None before the first
        # session) and the send times of heartbeats not yet answered, by number.
        self._lease = 0.0
        self._interval = 2.0  # between heartbeats (s); the coordinator names it
        self._lease_until: float | None = None
        self._heartbeats: dict[int, float] = {}
        self._heartbeat_seq = 0
        self._next_heartbeat = 0.0
        # One session at a time, whichever side dialled: the newest ends the one before.
        self._session_slot = asyncio.Lock()
        self._end_session: asyncio.Event | None = None  # ends the current session
        self._adopted = 0  # sessions a coordinator dialled (Node.Attach) running now
        self.not_adopted = asyncio.Event()  # set while there are none: the node dials its own
        self.not_adopted.set()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, *, dial: bool) -> None:
        """Keep the lease (a coordinator may attach any node) and, with `dial`, a session the
        node dials itself."""
        self._tasks.append(asyncio.create_task(self._guard_lease(), name="shoal-node-lease"))
        if dial:
            self._tasks.append(asyncio.create_task(self._dial_loop(), name="shoal-node-session"))

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def interval(self) -> float:
        """Seconds between heartbeats now, as the coordinator named them."""
        return self._interval

    def _renewed(self, sent: float) -> None:
        """The coordinator saw what this node sent at `sent` (monotonic): the lease runs again.

        A margin keeps this end before the coordinator's, which runs from when it received it.
        """
        until = sent + self._lease - min(1.0, self._lease * 0.2)
        if self._lease_until is None or until > self._lease_until:
            self._lease_until = until

    def _on_lease(self, renewed: node_pb2.LeaseRenewed) -> None:
        if renewed.HasField("lease"):  # the coordinator slowed this session's pace
            self._lease = _seconds(renewed.lease)
            self._interval = _seconds(renewed.heartbeat_interval)
            self._next_heartbeat = time.monotonic() + self._interval
        self.outbox.acked(renewed.seq)
        sent = self._heartbeats.pop(renewed.seq, None)
        if sent is not None:
            self._renewed(sent)
        for old in [s for s in self._heartbeats if s < renewed.seq]:
            del self._heartbeats[old]

    def check_lease(self) -> bool:
        """Self-fencing: past its lease the node stops every task (they now run elsewhere).

        Returns whether the lease has lapsed.
        """
        if self._lease_until is None or time.monotonic() < self._lease_until:
            return False
        self._host.fence()
        return True

    async def _guard_lease(self) -> None:
        while True:
            wait = 1.0
            if self._lease_until is not None:
                wait = min(wait, max(0.01, self._lease_until - time.monotonic()))
            await asyncio.sleep(wait)
            self.check_lease()

    def heartbeat_soon(self) -> None:
        """Heartbeat at once: what heartbeats say changed."""
        self._next_heartbeat = 0.0
        self.outbox.ready.set()

    async def _dial_loop(self) -> None:
        """Keep a session up: reconnect with jittered exponential backoff, reset after success.

        While a coordinator that dialled this node (Node.Attach) holds its session, it dials none.
        """
        wait = wait_exponential_jitter(
            initial=0.05, jitter=0.05, max=self._host.settings.reconnect_max.total_seconds()
        )
        try:
            while True:
                async for attempt in AsyncRetrying(
                    retry=retry_if_exception_type(_SessionFailed), wait=wait, reraise=True
                ):
                    with attempt:
                        await self.not_adopted.wait()
                        try:
                            await self._dial()
                        except (_SessionFailed, PermissionDenied, Unauthenticated):
                            raise
                        except Exception as err:  # e.g. TLS files mid-rotation: later again
                            _log.warning("node=%s cannot dial: %s", self._host.node_id, err)
                            raise _SessionFailed(str(err)) from err
        except (PermissionDenied, Unauthenticated) as err:
            _log.error("node=%s stops dialling: %s", self._host.node_id, err.message)
            self._host.refused(err)

    async def _dial(self) -> None:
        """One session this node dials: NodeGateway.Connect, its token in the call's metadata."""
        s = self._host.settings
        # A node paused past its lease learns it here at the latest: it stops what it runs
        # before telling the coordinator what it runs.
        self.check_lease()
        target = await self._host.discovery.async_coordinator()  # found again before each reconnect
        await self.not_adopted.wait()  # adopted meanwhile: that session stands
        channel = open_channel(
            target,
            max_message_bytes=_MAX_MESSAGE,
            tls_ca=s.tls_ca,
            tls_cert=s.tls_cert,
            tls_key=s.tls_key,
        )
        try:
            if isinstance(channel, LeaderChannel):  # several addresses over TLS
                await channel.found(_FIND_LEADER)
            stub = gateway_pb2_grpc.NodeGatewayStub(channel)
            # A coordinator given to the node, or verified by TLS, speaks for its cluster: its
            # refusal is final. One it found by itself is heard only once it proved itself.
            proven = bool(s.coordinator) or s.tls_ca is not None
            if self._host.token and not proven:
                # Found by itself, not verified by TLS: the token goes only to a proven one.
                await self._identify(stub, target)
                proven = True
            call = stub.Connect(metadata=bearer(self._host.token))
            try:
                await self._run_session(call, target)
            except _SessionFailed as err:
                if proven and err.code in _REFUSALS:
                    error, change = _REFUSALS[err.code]
                    raise error(
                        f"the coordinator at {target} refused this node: {err}. To join, {change}"
                    ) from None
                raise
            finally:
                call.cancel()
        finally:
            await channel.close()

    async def _identify(self, stub: gateway_pb2_grpc.NodeGatewayStub, address: str) -> None:
        try:
            await identify(stub, address, self._host.token, self._host.node_id)
        except Unproven as err:
            raise _SessionFailed(str(err)) from err

    async def attach(self, stream: SessionStream, peer: str) -> None:
        """The session of a coordinator that dialled this node (Node.Attach), until it ends.

        With a token, the node first has the coordinator prove it issued it, for this node and
        for an address of this node (a relay dialled at its own address cannot pass on a
        proof), and only then sends its Hello, token included. Without one, it takes any
        coordinator: only allowed when the node's service needs no token (loopback).
        """
        token = self._host.token
        if token:
            await challenge(stream, token, self._host.node_id, peer, self._host.own_addresses)
        elif self._host.settings.auth:
            raise FailedPrecondition("this node has no token: no coordinator can prove itself")
        self._adopted += 1
        self.not_adopted.clear()
        try:
            await self._run_session(stream, peer, token=token)
        finally:
            self._adopted -= 1
            if not self._adopted:
                self.not_adopted.set()

    async def _run_session(self, stream: SessionStream, peer: str, *, token: str = "") -> None:
        """Hello, Welcome, then assignments in and updates out until the stream ends.

        One session at a time, whichever side dialled: a new one ends the one before, and
        starts once that is torn down, so nothing the old one sends can arrive after Hello.
        """
        if self._end_session is not None:
            self._end_session.set()
        ended = self._end_session = asyncio.Event()
        async with self._session_slot:
            if ended.is_set():  # a newer session came meanwhile
                return
            claims = self.outbox.claims(self._host.running_attempts())
            hello = node_pb2.Hello(info=self._host.info(), running=claims, token=token)
            sent = time.monotonic()
            try:
                await stream.write(node_pb2.NodeMessage(hello=hello))
                first = await stream.read()
            except grpc.aio.AioRpcError as err:
                _log.warning(
                    "node=%s cannot join %s: %s %s",
                    self._host.node_id,
                    peer,
                    err.code().name,
                    err.details(),
                )
                raise _SessionFailed(err.details(), err.code()) from err
            if (
                not isinstance(first, node_pb2.CoordinatorMessage)
                or first.WhichOneof("msg") != "welcome"
            ):
                raise _SessionFailed("the coordinator did not welcome this node")
            welcome = first.welcome
            self._lease = _seconds(welcome.lease) or 10.0
            self._interval = _seconds(welcome.heartbeat_interval) or 2.0
            self._heartbeats.clear()
            self._renewed(sent)
            _log.info("node=%s session=%s up with %s", self._host.node_id, welcome.session_id, peer)
            self.connected.set()
            self.heartbeat_soon()
            halves = (
                asyncio.create_task(self._read(stream)),
                asyncio.create_task(self._write(stream)),
                asyncio.create_task(ended.wait()),
            )
            try:
                await asyncio.wait(halves, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self.connected.clear()
                self.outbox.resend_unacked()
                for half in halves:
                    half.cancel()
                # The stream may have ended under them: writing then fails with AioRpcError,
                # or with InvalidStateError once the call is finished.
                for result in await asyncio.gather(*halves, return_exceptions=True):
                    if isinstance(result, Exception) and not isinstance(
                        result, grpc.aio.AioRpcError | asyncio.InvalidStateError
                    ):
                        _log.error("node=%s session failed", self._host.node_id, exc_info=result)
            if ended.is_set():
                _log.info("node=%s session=%s replaced", self._host.node_id, welcome.session_id)
            else:
                _log.warning("node=%s session lost; reconnecting", self._host.node_id)

    async def _read(self, stream: SessionStream) -> None:
        while True:
            try:
                msg = await stream.read()
            except grpc.aio.AioRpcError as err:
                _log.warning("node=%s stream error: %s", self._host.node_id, err.details())
                return
            if not isinstance(msg, node_pb2.CoordinatorMessage):  # EOF, or malformed
                return
            kind = msg.WhichOneof("msg")
            if kind == "assignments":
                for a in msg.assignments.assignments:
                    self._host.assigned(a)
            elif kind == "cancels":
                for c in msg.cancels.attempts:
                    self._host.cancelled(c)
            elif kind == "lease":
                self._on_lease(msg.lease)
            elif kind == "drain":
                if msg.drain.undrain:
                    self._host.undrain()
                else:
                    self._host.drain(_seconds(msg.drain.grace), leave=msg.drain.leave)

    async def _write(self, stream: SessionStream) -> None:
        """Send updates as they come, and a heartbeat every interval whatever else goes."""
        while True:
            while (wait := min(self._next_heartbeat, self.outbox.due_at) - time.monotonic()) > 0:
                self.outbox.ready.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self.outbox.ready.wait()
            if self.check_lease():
                # The coordinator has given this node up, or will have by the time anything
                # written here arrives (its connection may be a black hole): a new session
                # carries what is in the outbox.
                _log.warning("node=%s lease lapsed: ending the session", self._host.node_id)
                return
            if self.outbox.due_at <= time.monotonic():
                batch, output = self.outbox.take()
                try:
                    await stream.write(
                        node_pb2.NodeMessage(updates=node_pb2.UpdateBatch(updates=batch))
                    )
                except BaseException:
                    self.outbox.put_back(batch, output)  # resend with the next session
                    raise
                self.outbox.sent(batch, self._heartbeat_seq + 1)
            now = time.monotonic()
            if now >= self._next_heartbeat:
                self._next_heartbeat = now + self._interval
                self._heartbeat_seq += 1
                self._heartbeats[self._heartbeat_seq] = now
                heartbeat = self._host.heartbeat()
                heartbeat.seq = self._heartbeat_seq
                await stream.write(node_pb2.NodeMessage(heartbeat=heartbeat))
