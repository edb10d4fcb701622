"""The node: holds one session with its coordinator and runs what it is assigned."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import platform
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import psutil
from grpc_health.v1._async import HealthServicer
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from shoal import __version__
from shoal._channel import bearer, open_channel
from shoal._server import HEALTH_POLICY, OPEN, Gate, grpc_options, method_path, serve_health
from shoal.auth import Principal, Role, attach_proof, hash_secret, parse_token, secret_matches
from shoal.config import NodeSettings, read_token
from shoal.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from shoal.node.deadline import PausableDeadline
from shoal.node.direct import DirectTask, DirectTasks, check_direct_request
from shoal.node.discovery import NodeDiscovery
from shoal.node.executors.base import ExecutionContext, Executor, Outcome, available_executors
from shoal.node.executors.groups import ProcessGroups
from shoal.node.executors.llm import LlmExecutor
from shoal.node.executors.ollama import OllamaExecutor
from shoal.node.executors.tool import ToolExecutor
from shoal.node.fingerprint import MachineProbe
from shoal.node.guard import ForegroundLoad, ResourceGuard, Thresholds
from shoal.node.health import node_health
from shoal.node.ledger import Ledger
from shoal.node.report import RunReport
from shoal.node.secrets import MissingSecrets, Redactor, SecretStore
from shoal.node.service import NodeService, check_service_access
from shoal.node.slots import Slots
from shoal.specs import executor_of
from shoal.v1 import gateway_pb2_grpc, node_pb2, node_pb2_grpc, task_pb2

__all__ = ["NodeAgent"]

_log = logging.getLogger("shoal.node")
_MAX_OUTBOX = 10_000
_MAX_MESSAGE = 16 << 20
_POLICY = {
    **HEALTH_POLICY,
    # A coordinator attaching the node proves itself inside the stream (see NodeAgent.attach).
    method_path(node_pb2.DESCRIPTOR, "Node", "Attach"): OPEN,
}
"""Everything else (the rest of the Node service) needs the node's token."""
_FLUSH_BEFORE_LEAVING = 5.0  # seconds a leaving node waits for its last updates to go out
_SAMPLE_LOAD_EVERY = 1.0  # seconds between two samples of the machine's load (the guard)
_NO_SECRETS = Redactor()  # what tasks without secrets are redacted with: nothing
_LOOK_AT_OLLAMA_EVERY = 10.0  # seconds between two looks at what the Ollama server holds


class SessionStream(Protocol):
    """Either end of a session's stream: the call a node dialled, or the context of an Attach."""

    async def read(self) -> Any: ...

    async def write(self, message: Any, /) -> None: ...


class _SessionFailed(Exception):
    """The session could not be established (or broke before Welcome)."""


class _Stop:
    """Why a run was stopped before it ended by itself."""

    CANCEL = "cancelled"
    FENCE = "stopped by its node: the node's lease ended, so the task runs elsewhere"
    RELEASE = "given back: the node is draining"
    # Direct tasks: there is no coordinator to give them back to.
    DRAIN = "stopped: the node is draining"
    SHUTDOWN = "stopped: the node is shutting down"


@dataclass(eq=False)
class _Run:
    task_id: str
    attempt: task_pb2.AttemptId  # none (zeros) for a direct task
    report: RunReport  # where its progress goes
    priority: int = task_pb2.PRIORITY_NORMAL
    slot: bool = False  # whether it holds one of the node's slots
    task: asyncio.Task[None] | None = None
    stop: str = ""  # a _Stop reason, once stopped
    groups: ProcessGroups = field(default_factory=ProcessGroups)  # its processes, to pause
    deadline: PausableDeadline = field(default_factory=PausableDeadline)  # its timeout

    def pause(self) -> None:
        """Stop its processes (SIGSTOP; any it starts later, too) and its timeout's clock."""
        self.groups.pause()
        self.deadline.pause()

    def resume(self) -> None:
        """Let its processes run again (SIGCONT); its timeout goes on from where it stopped."""
        self.deadline.resume()
        self.groups.resume()


@dataclass(frozen=True)
class _AttemptReport:
    """The progress of an attempt the coordinator assigned: into the ledger and the outbox."""

    task_id: str
    attempt: task_pb2.AttemptId
    ledger: Ledger
    push: Callable[[node_pb2.TaskUpdate], None]

    def _update(self, **kw: Any) -> None:
        self.push(node_pb2.TaskUpdate(task_id=self.task_id, attempt=self.attempt, **kw))

    def started(self) -> None:
        self.ledger.write("start", self.task_id, self.attempt)
        self._update(started=node_pb2.Started())

    def output(self, chunk: task_pb2.OutputChunk) -> None:
        self._update(output=chunk)

    def finished(self, outcome: Outcome) -> None:
        self.ledger.finished(self.task_id, self.attempt, outcome.state, fenced=False)
        self._update(finished=node_pb2.Finished(state=outcome.state, result=outcome.result))  # type: ignore[arg-type]

    def released(self, why: str, outcome: Outcome) -> None:
        # Not an outcome: stopped from outside the task. A coordinator that still counts it as
        # running (a fenced node may be wrong about its lease) queues it again.
        if why == _Stop.FENCE:
            self.ledger.finished(self.task_id, self.attempt, outcome.state, fenced=True)
        else:
            self.ledger.write("release", self.task_id, self.attempt)
        self._update(released=node_pb2.Released(reason=why))


def _seconds(d: object) -> float:
    return d.ToNanoseconds() / 1e9  # type: ignore[attr-defined, no-any-return]


class NodeAgent:
    """A standalone node: `start()`, then `stop()` (idempotent), or `shutdown()` to drain first.

    Liveness: the node heartbeats every interval the coordinator names, numbering each; the
    coordinator answers with the number, renewing the lease from the moment that heartbeat was
    sent. So the node's view of its lease always ends before the coordinator's, and a node that
    cannot renew it (partitioned, paused, coordinator gone) stops its own tasks first:
    by then they are being dispatched again elsewhere.
    """

    def __init__(
        self,
        settings: NodeSettings,
        *,
        executors: dict[str, Executor] | None = None,
    ) -> None:
        self.settings = settings
        self.node_id = settings.resolved_node_id()
        self.executors = executors if executors is not None else available_executors(settings)
        self.secrets = SecretStore.from_settings(settings)
        self.connected = asyncio.Event()  # set while a session is up
        self.left = asyncio.Event()  # set once drained to leave: the process should end
        self.draining = False
        self.port = 0
        self._runs: dict[str, _Run] = {}  # the coordinator's attempts, by task id
        self._direct: dict[str, _Run] = {}  # tasks run for callers of the node's service
        self.direct = DirectTasks()  # what those callers see of them, kept a while
        self.slots = Slots(settings.slots)  # shared by both kinds of run
        self.machine = MachineProbe()  # GPUs, Docker, Ollama: probed at start, now and then after
        self._idle = asyncio.Event()  # set while nothing runs
        self._idle.set()
        self._outbox: list[node_pb2.TaskUpdate] = []
        self._outbox_ready = asyncio.Event()
        self._flushed = asyncio.Event()  # set while every update was written to a stream
        self._flushed.set()
        self._background: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._guard_task: asyncio.Task[None] | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._leaving = False
        self._server: grpc.aio.Server | None = None
        self._health: HealthServicer | None = None
        self._token = ""
        self._ledger = Ledger(settings.ledger, self.node_id)
        self.discovery = NodeDiscovery(settings, self.info)
        # The lease: its length (from Welcome), when it ends (monotonic; None before the first
        # session) and the send times of heartbeats not yet answered, by number.
        self._lease = 0.0
        self._lease_until: float | None = None
        self._heartbeats: dict[int, float] = {}
        self._heartbeat_seq = 0
        self._next_heartbeat = 0.0
        # One session at a time, whichever side dialled: the newest ends the one before.
        self._session_slot = asyncio.Lock()
        self._end_session: asyncio.Event | None = None  # ends the current session
        self._adopted = 0  # sessions a coordinator dialled (Node.Attach) running now
        self._not_adopted = asyncio.Event()  # set while there are none: the node dials its own
        self._not_adopted.set()
        # The resource guard: while the machine is busy with its own work, only tasks of
        # `_floor` or higher priority are taken (and background ones paused, by policy).
        self.guard = (
            ResourceGuard(
                ForegroundLoad(),
                Thresholds(
                    cpu_percent=settings.guard_cpu_percent,
                    memory_percent=settings.guard_memory_percent,
                    margin=settings.guard_margin_percent,
                    busy_after=settings.guard_busy_after,
                    calm_after=settings.guard_calm_after,
                ),
            )
            if settings.guard
            else None
        )
        self._floor = task_pb2.Priority.Value("PRIORITY_" + settings.guard_min_priority.upper())
        self._load_task: asyncio.Task[None] | None = None
        # The node's Ollama server: its models, and those it holds in memory now (heartbeats
        # carry them, so the coordinator prefers a node where a task's model is loaded).
        ollama = self.executors.get("ollama")
        self._ollama = ollama if isinstance(ollama, OllamaExecutor) else None
        self._ollama_models: list[str] = []
        self._loaded_models: list[str] = []
        self._ollama_task: asyncio.Task[None] | None = None
        self._guard_reported: tuple[bool, int, int, str] = (False, 0, 0, "")

    def info(self) -> node_pb2.NodeInfo:
        """This node's fingerprint and capabilities."""
        s = self.settings
        machine = self.machine.current()
        return node_pb2.NodeInfo(
            node_id=self.node_id,
            hostname=socket.gethostname(),
            version=__version__,
            labels=self.settings.labels,
            executors=sorted(self.executors),
            slots=self.settings.slots,
            resources=node_pb2.Resources(
                cpus=s.cpus if s.cpus is not None else psutil.cpu_count() or 1,
                memory_mb=(
                    s.memory_mb if s.memory_mb is not None else psutil.virtual_memory().total >> 20
                ),
                gpus=s.gpus if s.gpus is not None else len(machine.gpus),
            ),
            models=s.models,
            weight=s.weight,
            python_version=platform.python_version(),
            detected_gpus=[node_pb2.Gpu(name=g.name, memory_mb=g.memory_mb) for g in machine.gpus],
            docker_available=machine.docker_available,
            ollama_models=self._ollama_models if self._ollama else machine.ollama_models,
            tools=tool.tools()
            if isinstance(tool := self.executors.get("tool"), ToolExecutor)
            else [],
            loaded_models=self._loaded_models,
            llm_providers=llm.configured()
            if isinstance(llm := self.executors.get("llm"), LlmExecutor)
            else [],
        )

    @property
    def running(self) -> int:
        return len(self._runs)

    def _authenticate(self, token: str) -> Principal:
        """Callers of the node's own service present the node's token."""
        if not self._token or not secret_matches(token, hash_secret(self._token)):
            raise Unauthenticated("invalid token")
        return Principal("node-operator", Role.ADMIN)

    async def start(self) -> None:
        self._token = await asyncio.to_thread(
            read_token, self.settings.token, self.settings.token_file
        )
        check_service_access(self.settings, self._token)
        await self.machine.async_refresh()
        for name, executor in list(self.executors.items()):
            if not await executor.async_available():
                _log.warning(
                    "node=%s executor=%s not available here: not offered", self.node_id, name
                )
                del self.executors[name]
        if "ollama" not in self.executors:
            self._ollama = None  # what the machine probe finds is all there is to say
        if self._ollama is not None:
            await self._look_at_ollama(self._ollama)
            self._ollama_task = asyncio.create_task(
                self._follow_ollama(self._ollama), name="shoal-node-ollama"
            )
        gate = Gate(_POLICY, self._authenticate if self.settings.auth else None)
        server = grpc.aio.server(options=grpc_options(_MAX_MESSAGE), interceptors=[gate])
        node_pb2_grpc.add_NodeServicer_to_server(NodeService(self), server)
        self._health = await serve_health(server, tuple(name for name in self.health() if name))
        self.port = server.add_insecure_port(self.settings.listen)
        await server.start()
        self._server = server
        await self.discovery.async_start(self.port)
        # A coordinator may attach any node, a standalone one too: the lease is kept either way.
        self._guard_task = asyncio.create_task(self._guard_lease(), name="shoal-node-lease")
        if not self.settings.standalone:  # standalone: it dials no coordinator
            self._loop_task = asyncio.create_task(self._session_loop(), name="shoal-node-session")
        if self.guard is not None:
            self._load_task = asyncio.create_task(
                self._watch_load(self.guard), name="shoal-node-load"
            )
        _log.info(
            "node=%s serving on port %d, coordinator=%s slots=%d executors=%s",
            self.node_id,
            self.port,
            "none (standalone)"
            if self.settings.standalone
            else self.settings.coordinator or f"(mDNS, cluster {self.settings.cluster})",
            self.settings.slots,
            ",".join(sorted(self.executors)),
        )

    async def stop(self) -> None:
        """Stop at once: running tasks are killed (the coordinator runs them again)."""
        for name in ("_drain_task", "_loop_task", "_guard_task", "_load_task", "_ollama_task"):
            task = getattr(self, name)
            setattr(self, name, None)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for run in self._direct.values():
            self._stop(run, _Stop.SHUTDOWN)  # its caller hears how it ended
        for run in self._every_run():
            run.resume()  # never leave a task's processes stopped
        runs = [r.task for r in self._every_run() if r.task is not None]
        for task in runs:
            task.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
        await asyncio.gather(*(e.aclose() for e in self.executors.values()))
        await self.machine.aclose()
        await self.discovery.async_stop()
        server, self._server = self._server, None
        if server is not None:
            await server.stop(1.0)
        self._ledger.close()

    async def shutdown(self, grace: float | None = None) -> None:
        """Drain (finish running tasks within `grace` s, give back the rest), then stop."""
        if grace is None:
            grace = self.settings.drain_grace.total_seconds()
        self.drain(grace, leave=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace + _FLUSH_BEFORE_LEAVING + 1):
                await self.left.wait()
        await self.stop()

    # -- draining --------------------------------------------------------------------------

    def drain(self, grace: float, *, leave: bool = False) -> None:
        """Take no new work; let running tasks end within `grace` s, then give back the rest.

        With `leave`, `left` is set once that is done and the last updates went out.
        """
        self._leaving = self._leaving or leave
        if not self.draining:
            _log.info("node=%s draining (grace %g s)", self.node_id, grace)
            self.draining = True
            self._publish_health()
            self._heartbeat_soon()
        if self._drain_task is None or self._drain_task.done():
            self._drain_task = asyncio.create_task(self._drain(grace), name="shoal-node-drain")

    def undrain(self) -> None:
        """Take work again; also calls off a pending leave, if the process has not ended."""
        if not self.draining:
            return
        _log.info("node=%s takes work again", self.node_id)
        self.draining = False
        self._leaving = False
        self.left.clear()
        if self._drain_task is not None:
            self._drain_task.cancel()
            self._drain_task = None
        self._publish_health()
        self._heartbeat_soon()

    async def _drain(self, grace: float) -> None:
        try:
            async with asyncio.timeout(grace):
                await self._idle.wait()
        except TimeoutError:
            runs = [r for r in self._runs.values() if r.task is not None and not r.stop]
            _log.warning("node=%s grace over: giving back %d tasks", self.node_id, len(runs))
            for run in runs:
                self._stop(run, _Stop.RELEASE)
            for run in [r for r in self._direct.values() if not r.stop]:
                self._stop(run, _Stop.DRAIN)
            await self._idle.wait()
        if not self._leaving:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_FLUSH_BEFORE_LEAVING):
                await self._flushed.wait()
        _log.info("node=%s drained; leaving", self.node_id)
        self.left.set()

    # -- health ----------------------------------------------------------------------------

    def health(self) -> dict[str, int]:
        """The health of every name the node serves ('', its Node service, each executor),
        from its state now: NOT_SERVING while it drains or its resource guard throttles it."""
        return node_health(
            self.executors,
            draining=self.draining,
            throttled=self.guard is not None and self.guard.busy,
        )

    def _publish_health(self) -> None:
        """Bring the health service up to date with `health()` (in the background)."""
        if self._health is not None:
            task = asyncio.create_task(self._apply_health(self._health))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _apply_health(self, servicer: HealthServicer) -> None:
        # Computed when it runs, not when asked for: of several updates, the last one wins.
        for name, status in self.health().items():
            await servicer.set(name, status)

    # -- the lease -------------------------------------------------------------------------

    def _renewed(self, sent: float) -> None:
        """The coordinator saw what this node sent at `sent` (monotonic): the lease runs again.

        A margin keeps this end before the coordinator's, which runs from when it received it.
        """
        until = sent + self._lease - min(1.0, self._lease * 0.2)
        if self._lease_until is None or until > self._lease_until:
            self._lease_until = until

    def _on_lease(self, seq: int) -> None:
        sent = self._heartbeats.pop(seq, None)
        if sent is not None:
            self._renewed(sent)
        for old in [s for s in self._heartbeats if s < seq]:
            del self._heartbeats[old]

    def _check_lease(self) -> bool:
        """Self-fencing: past its lease the node stops every task (they now run elsewhere).

        Returns whether the lease has lapsed.
        """
        if self._lease_until is None or time.monotonic() < self._lease_until:
            return False
        runs = [r for r in self._runs.values() if r.task is not None and not r.stop]
        if runs:
            _log.warning(
                "node=%s could not renew its lease: stopping %d tasks", self.node_id, len(runs)
            )
            for run in runs:
                self._stop(run, _Stop.FENCE)
        return True

    async def _guard_lease(self) -> None:
        while True:
            wait = 1.0
            if self._lease_until is not None:
                wait = min(wait, max(0.01, self._lease_until - time.monotonic()))
            await asyncio.sleep(wait)
            self._check_lease()

    def _heartbeat_soon(self) -> None:
        self._next_heartbeat = 0.0
        self._outbox_ready.set()

    # -- the Ollama server -------------------------------------------------------------------

    async def _look_at_ollama(self, ollama: OllamaExecutor) -> None:
        models, loaded = await asyncio.gather(ollama.models(), ollama.loaded_models())
        if loaded != self._loaded_models:
            self._heartbeat_soon()
        self._ollama_models, self._loaded_models = models, loaded

    async def _follow_ollama(self, ollama: OllamaExecutor) -> None:
        while True:
            await asyncio.sleep(_LOOK_AT_OLLAMA_EVERY)
            await self._look_at_ollama(ollama)

    # -- the resource guard ----------------------------------------------------------------

    async def _watch_load(self, guard: ResourceGuard) -> None:
        """Sample the machine's foreground load; act when it turns busy or calm."""
        while True:
            sessions = [pgid for run in self._every_run() for pgid in run.groups]
            try:
                changed = await guard.async_check(sessions)
            except (psutil.Error, OSError) as err:
                _log.warning("node=%s cannot sample the machine's load: %s", self.node_id, err)
                changed = False
            if changed:
                self._load_changed(guard)
            await asyncio.sleep(_SAMPLE_LOAD_EVERY)

    def _load_changed(self, guard: ResourceGuard) -> None:
        pausing = self.settings.guard_policy == "pause"
        if guard.busy:
            _log.warning(
                "node=%s machine busy (%s): taking %s priority or higher only%s",
                self.node_id,
                guard.reason,
                self.settings.guard_min_priority,
                "; pausing background tasks" if pausing else "",
            )
        else:
            _log.info("node=%s machine calm again (%s)", self.node_id, guard.last)
        for run in self._every_run():
            if not guard.busy:
                run.resume()
            elif pausing and run.priority == task_pb2.PRIORITY_BACKGROUND:
                run.pause()
        self._report_guard()
        self._publish_health()

    def _pausing(self) -> bool:
        """Whether background tasks are to be paused now."""
        return self.guard is not None and self.guard.busy and self.settings.guard_policy == "pause"

    def _guard_state(self) -> tuple[bool, int, int, str]:
        """What heartbeats say of the guard: throttled, the lowest priority taken, tasks
        paused, and why."""
        paused = sum(1 for run in self._every_run() if run.groups.stopped)
        if self.guard is None or not self.guard.busy:
            return False, 0, paused, ""
        return True, self._floor, paused, self.guard.reason

    def _report_guard(self) -> None:
        """Heartbeat at once when what heartbeats say of the guard changed."""
        state = self._guard_state()
        if state != self._guard_reported:
            self._guard_reported = state
            self._heartbeat_soon()

    # -- the session -----------------------------------------------------------------------

    async def _session_loop(self) -> None:
        """Keep a session up: reconnect with jittered exponential backoff, reset after success.

        While a coordinator that dialled this node (Node.Attach) holds its session, it dials none.
        """
        wait = wait_exponential_jitter(
            initial=0.05, jitter=0.05, max=self.settings.reconnect_max.total_seconds()
        )
        while True:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(_SessionFailed), wait=wait, reraise=True
            ):
                with attempt:
                    await self._not_adopted.wait()
                    await self._dial()

    async def _dial(self) -> None:
        """One session this node dials: NodeGateway.Connect, its token in the call's metadata."""
        s = self.settings
        # A node paused past its lease learns it here at the latest: it stops what it runs
        # before telling the coordinator what it runs.
        self._check_lease()
        target = await self.discovery.async_coordinator()  # found again before each reconnect
        await self._not_adopted.wait()  # adopted meanwhile: that session stands
        channel = open_channel(
            target,
            max_message_bytes=_MAX_MESSAGE,
            tls_ca=s.tls_ca,
            tls_cert=s.tls_cert,
            tls_key=s.tls_key,
        )
        try:
            call = gateway_pb2_grpc.NodeGatewayStub(channel).Connect(metadata=bearer(self._token))
            try:
                await self._run_session(call, target)
            finally:
                call.cancel()
        finally:
            await channel.close()

    async def attach(self, stream: SessionStream, peer: str) -> None:
        """The session of a coordinator that dialled this node (Node.Attach), until it ends.

        With a token, the node first has the coordinator prove it issued it (it holds the hash
        of its secret), and only then sends its Hello, token included. Without one, it takes
        any coordinator: only allowed when the node's service needs no token (loopback).
        """
        token_id = ""
        if self._token:
            token_id, secret = parse_token(self._token)
            nonce = os.urandom(32)
            await stream.write(
                node_pb2.NodeMessage(
                    challenge=node_pb2.AttachChallenge(token_id=token_id, nonce=nonce)
                )
            )
            answer = await stream.read()
            if (
                not isinstance(answer, node_pb2.CoordinatorMessage)
                or answer.WhichOneof("msg") != "proof"
                or not hmac.compare_digest(
                    answer.proof.mac, attach_proof(hash_secret(secret), token_id, nonce)
                )
            ):
                _log.warning("node=%s refused a coordinator at %s: no proof", self.node_id, peer)
                raise Unauthenticated(
                    "only the coordinator that issued this node's token may attach it"
                )
        elif self.settings.auth:
            raise FailedPrecondition("this node has no token: no coordinator can prove itself")
        self._adopted += 1
        self._not_adopted.clear()
        try:
            await self._run_session(stream, peer, token=self._token if token_id else "")
        finally:
            self._adopted -= 1
            if not self._adopted:
                self._not_adopted.set()

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
            hello = node_pb2.Hello(
                info=self.info(),
                running=[
                    node_pb2.RunningAttempt(task_id=r.task_id, attempt=r.attempt)
                    for r in self._runs.values()
                    if not r.stop
                ],
                token=token,
            )
            sent = time.monotonic()
            try:
                await stream.write(node_pb2.NodeMessage(hello=hello))
                first = await stream.read()
            except grpc.aio.AioRpcError as err:
                _log.warning(
                    "node=%s cannot join %s: %s %s",
                    self.node_id,
                    peer,
                    err.code().name,
                    err.details(),
                )
                raise _SessionFailed(err.details()) from err
            if (
                not isinstance(first, node_pb2.CoordinatorMessage)
                or first.WhichOneof("msg") != "welcome"
            ):
                raise _SessionFailed("the coordinator did not welcome this node")
            welcome = first.welcome
            self._lease = _seconds(welcome.lease) or 10.0
            self._heartbeats.clear()
            self._renewed(sent)
            _log.info("node=%s session=%s up with %s", self.node_id, welcome.session_id, peer)
            self.connected.set()
            self._heartbeat_soon()
            halves = (
                asyncio.create_task(self._read(stream)),
                asyncio.create_task(self._write(stream, _seconds(welcome.heartbeat_interval))),
                asyncio.create_task(ended.wait()),
            )
            try:
                await asyncio.wait(halves, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self.connected.clear()
                for half in halves:
                    half.cancel()
                # The stream may have ended under them: writing then fails with AioRpcError,
                # or with InvalidStateError once the call is finished.
                for result in await asyncio.gather(*halves, return_exceptions=True):
                    if isinstance(result, Exception) and not isinstance(
                        result, grpc.aio.AioRpcError | asyncio.InvalidStateError
                    ):
                        _log.error("node=%s session failed", self.node_id, exc_info=result)
            if ended.is_set():
                _log.info("node=%s session=%s replaced", self.node_id, welcome.session_id)
            else:
                _log.warning("node=%s session lost; reconnecting", self.node_id)

    async def _read(self, stream: SessionStream) -> None:
        while True:
            try:
                msg = await stream.read()
            except grpc.aio.AioRpcError as err:
                _log.warning("node=%s stream error: %s", self.node_id, err.details())
                return
            if not isinstance(msg, node_pb2.CoordinatorMessage):  # EOF, or malformed
                return
            kind = msg.WhichOneof("msg")
            if kind == "assignments":
                for a in msg.assignments.assignments:
                    self._start(a)
            elif kind == "cancels":
                for c in msg.cancels.attempts:
                    self._cancel(c)
            elif kind == "lease":
                self._on_lease(msg.lease.seq)
            elif kind == "drain":
                if msg.drain.undrain:
                    self.undrain()
                else:
                    self.drain(_seconds(msg.drain.grace), leave=msg.drain.leave)

    async def _write(self, stream: SessionStream, interval: float) -> None:
        """Send updates as they come, and a heartbeat every `interval` s whatever else goes."""
        interval = interval or 2.0
        while True:
            wait = self._next_heartbeat - time.monotonic()
            if wait > 0 and not self._outbox:
                self._outbox_ready.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._outbox_ready.wait()
            if self._check_lease():
                # The coordinator has given this node up, or will have by the time anything
                # written here arrives (its connection may be a black hole): a new session
                # carries what is in the outbox.
                _log.warning("node=%s lease lapsed: ending the session", self.node_id)
                return
            if self._outbox:
                batch, self._outbox = self._outbox, []
                try:
                    await stream.write(
                        node_pb2.NodeMessage(updates=node_pb2.UpdateBatch(updates=batch))
                    )
                except BaseException:
                    self._outbox[:0] = batch  # resend with the next session
                    raise
                if not self._outbox:
                    self._flushed.set()
            now = time.monotonic()
            if now >= self._next_heartbeat:
                self._next_heartbeat = now + interval
                self._heartbeat_seq += 1
                self._heartbeats[self._heartbeat_seq] = now
                throttled, floor, paused, reason = self._guard_state()
                await stream.write(
                    node_pb2.NodeMessage(
                        heartbeat=node_pb2.Heartbeat(
                            running=len(self._runs),
                            free_slots=self.slots.free,  # direct tasks hold slots too
                            seq=self._heartbeat_seq,
                            draining=self.draining,
                            throttled=throttled,
                            min_priority=floor,  # type: ignore[arg-type]
                            paused=paused,
                            throttle_reason=reason,
                            loaded_models=self._loaded_models,
                        )
                    )
                )

    def _push(self, update: node_pb2.TaskUpdate) -> None:
        if len(self._outbox) >= _MAX_OUTBOX and update.WhichOneof("update") == "output":
            return  # disconnected for long: output is dropped first, results never
        self._outbox.append(update)
        self._outbox_ready.set()
        self._flushed.clear()

    # -- direct tasks: the node's own service ----------------------------------------------

    def execute(self, spec: task_pb2.TaskSpec, task_id: str = "") -> DirectTask:
        """Run `spec` here now, in a free slot, for a caller of the node's own service.

        Raises, changing nothing: InvalidArgument or FailedPrecondition (a spec this node cannot
        run), Unavailable (draining, or too busy for its priority), ResourceExhausted (no free
        slot), AlreadyExists (`task_id` is taken).
        """
        check_direct_request(spec, task_id, self.executors)
        if self.draining:
            raise Unavailable(f"node {self.node_id} is draining: it takes no new work")
        priority = spec.priority or task_pb2.PRIORITY_NORMAL
        if self.guard is not None and self.guard.busy and priority > self._floor:
            raise Unavailable(
                f"node {self.node_id} is busy ({self.guard.reason}): it takes"
                f" {self.settings.guard_min_priority} priority or higher only"
            )
        if not self.slots.try_take():
            raise ResourceExhausted(
                f"node {self.node_id} has no free slot: all {self.slots.total} are taken"
            )
        try:
            task = self.direct.new(task_id)
        except AlreadyExists:
            self.slots.give()
            raise
        _log.info("node=%s task=%s runs directly (%s)", self.node_id, task.id, executor_of(spec))
        self._launch(_Run(task.id, task_pb2.AttemptId(), task, slot=True), spec, self._direct)
        return task

    def cancel_direct(self, task_id: str) -> DirectTask:
        """Stop a direct task (NotFound: no such task); its `ended` is set once it has ended."""
        task = self.direct.get(task_id)
        run = self._direct.get(task_id)
        if run is not None and not run.stop:
            _log.info("node=%s task=%s cancelling", self.node_id, task_id)
            self._stop(run, _Stop.CANCEL)
        return task

    # -- running tasks ---------------------------------------------------------------------

    def _start(self, a: node_pb2.Assignment) -> None:
        if self.draining:
            # Assigned before the coordinator heard of the drain: given back, never started.
            self._ledger.write("release", a.task_id, a.attempt)
            self._push(
                node_pb2.TaskUpdate(
                    task_id=a.task_id,
                    attempt=a.attempt,
                    released=node_pb2.Released(reason=_Stop.RELEASE),
                )
            )
            return
        run = self._runs.get(a.task_id)
        if run is not None:
            if run.attempt == a.attempt:
                return  # a repeated assignment
            self._stop(run, _Stop.CANCEL)
        report = _AttemptReport(a.task_id, a.attempt, self._ledger, self._push)
        self._launch(_Run(a.task_id, a.attempt, report), a.spec, self._runs)

    def _launch(self, run: _Run, spec: task_pb2.TaskSpec, table: dict[str, _Run]) -> None:
        """Start a run, the coordinator's or a direct one, and keep it in `table` while it runs."""
        run.priority = spec.priority or task_pb2.PRIORITY_NORMAL
        run.groups = ProcessGroups(self._report_guard)
        if self._pausing() and run.priority == task_pb2.PRIORITY_BACKGROUND:
            run.pause()  # sent before the coordinator heard that the machine is busy
        table[run.task_id] = run
        self._idle.clear()
        run.task = asyncio.create_task(self._run(run, spec), name=f"shoal-task-{run.task_id}")

    def _every_run(self) -> list[_Run]:
        """The coordinator's attempts and the direct tasks running now."""
        return [*self._runs.values(), *self._direct.values()]

    def _cancel(self, c: node_pb2.RunningAttempt) -> None:
        run = self._runs.get(c.task_id)
        if run is not None and run.attempt == c.attempt and not run.stop:
            _log.info("node=%s task=%s cancelling", self.node_id, c.task_id)
            self._stop(run, _Stop.CANCEL)

    @staticmethod
    def _stop(run: _Run, why: str) -> None:
        run.stop = why
        run.resume()  # a paused task runs again before it is killed
        if run.task is not None:
            run.task.cancel()

    async def _run(self, run: _Run, spec: task_pb2.TaskSpec) -> None:
        try:
            outcome = await self._execute(run, spec)
        except Exception as err:  # a bug: still report an outcome, or the slot stays taken
            _log.exception("node=%s task=%s failed to run", self.node_id, run.task_id)
            outcome = Outcome(
                task_pb2.TASK_STATE_FAILED,
                task_pb2.TaskResult(
                    error=f"node {self.node_id} failed to run it: {type(err).__name__}",
                    infrastructure_failure=True,
                ),
            )
        finally:
            self._forget(run)
        if run.stop in (_Stop.RELEASE, _Stop.FENCE):
            run.report.released(run.stop, outcome)
        else:
            run.report.finished(outcome)

    def _forget(self, run: _Run) -> None:
        """It ended: out of its table, and its slot given back."""
        for table in (self._runs, self._direct):
            if table.get(run.task_id) is run:
                del table[run.task_id]
        if run.slot:
            run.slot = False
            self.slots.give()
        if not self._runs and not self._direct:
            self._idle.set()

    async def _take_slot(self, run: _Run) -> None:
        if not self.slots.free:
            _log.info(
                "node=%s task=%s waits for a slot: %d direct tasks hold some",
                self.node_id,
                run.task_id,
                len(self._direct),
            )
        await self.slots.take()
        run.slot = True

    async def _execute(self, run: _Run, spec: task_pb2.TaskSpec) -> Outcome:
        name = executor_of(spec)
        executor = self.executors.get(name)
        if executor is None:
            return Outcome(
                task_pb2.TASK_STATE_FAILED,
                task_pb2.TaskResult(
                    error=f"executor {name!r} is not available on node {self.node_id}",
                    infrastructure_failure=True,
                ),
            )
        timeout = spec.timeout.ToNanoseconds() / 1e9 if spec.HasField("timeout") else None
        redactor = _NO_SECRETS
        try:
            if not run.slot:
                await self._take_slot(run)
            try:
                secret_env = (
                    await asyncio.to_thread(self.secrets.resolve, spec.secrets)
                    if spec.secrets
                    else {}
                )
            except MissingSecrets as err:
                # Another node may hold them: this node's shortcoming, not the task's.
                _log.warning("node=%s task=%s %s", self.node_id, run.task_id, err.message)
                return Outcome(
                    task_pb2.TASK_STATE_FAILED,
                    task_pb2.TaskResult(
                        error=f"{err.message} (node {self.node_id})", infrastructure_failure=True
                    ),
                )
            except InvalidArgument as err:
                return Outcome(task_pb2.TASK_STATE_FAILED, task_pb2.TaskResult(error=err.message))
            if secret_env:
                redactor = Redactor(secret_env.values())
            run.report.started()
            ctx = ExecutionContext(
                run.task_id,
                run.report.output,
                self.settings.output_tail_bytes,
                secret_env=secret_env,
                redactor=redactor,
                workdir=self.settings.workdir,
                groups=run.groups,
            )
            if timeout is None:  # nothing to time: no timeout to pause either
                outcome = await executor.run(spec, ctx)
            else:
                async with run.deadline.running(timeout):
                    outcome = await executor.run(spec, ctx)
        except TimeoutError:
            return Outcome(
                task_pb2.TASK_STATE_TIMED_OUT,
                task_pb2.TaskResult(exit_code=-9, error=f"timed out after {timeout:g} s"),
            )
        except asyncio.CancelledError:
            if not run.stop:
                raise
            return Outcome(
                task_pb2.TASK_STATE_CANCELLED,
                task_pb2.TaskResult(exit_code=-9, error=run.stop),
            )
        except Exception as err:
            # Formatted here rather than by logging, so that it can be redacted.
            _log.error(
                "node=%s task=%s executor %s failed\n%s",
                self.node_id,
                run.task_id,
                name,
                redactor.redact("".join(traceback.format_exception(err))).rstrip(),
            )
            return Outcome(
                task_pb2.TASK_STATE_FAILED,
                task_pb2.TaskResult(
                    error=redactor.redact(f"executor {name} failed: {err}"),
                    infrastructure_failure=True,
                ),
            )
        if redactor:
            # Whatever the executor did, no value leaves the node in the result.
            result = outcome.result
            result.error = redactor.redact(result.error)
            result.stdout = redactor.redact(result.stdout)
            result.stderr = redactor.redact(result.stderr)
        return outcome
