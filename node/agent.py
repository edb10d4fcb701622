"""The node: runs what its coordinator assigns and what callers of its service send it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import psutil
from grpc_health.v1._async import HealthServicer

from shoal import __version__
from shoal._output import result_text, set_result_text
from shoal._reflection import serve_reflection
from shoal._server import (
    HEALTH_POLICY,
    HEALTH_SERVICE,
    OPEN,
    Gate,
    listen,
    method_path,
    serve_health,
    server_credentials,
    server_options,
)
from shoal.auth import Principal, Role, check_token, hash_secret, secret_matches
from shoal.config import NodeSettings, read_token
from shoal.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    ShoalError,
    Unauthenticated,
    Unavailable,
)
from shoal.handshake import OwnAddresses
from shoal.node.deadline import PausableDeadline
from shoal.node.direct import DirectTask, DirectTasks, check_direct_request
from shoal.node.discovery import NodeDiscovery
from shoal.node.executors.base import (
    ExecutionContext,
    Executor,
    Outcome,
    RunFailed,
    TaskError,
    available_executors,
    unpaced,
)
from shoal.node.executors.groups import ProcessGroups
from shoal.node.executors.llm import LlmExecutor
from shoal.node.executors.ollama import OllamaExecutor
from shoal.node.executors.tool import ToolExecutor
from shoal.node.fingerprint import MachineProbe
from shoal.node.guard import ForegroundLoad, ResourceGuard, Thresholds
from shoal.node.health import node_health
from shoal.node.ledger import Ledger
from shoal.node.output import OutputCap
from shoal.node.report import RunReport
from shoal.node.secrets import MissingSecrets, Redactor, SecretsNotGranted, SecretStore
from shoal.node.service import NodeService, check_service_access
from shoal.node.session import CoordinatorLink
from shoal.node.slots import Slots
from shoal.specs import executor_of
from shoal.v1 import node_pb2, node_pb2_grpc, task_pb2

__all__ = ["NodeAgent"]

_log = logging.getLogger("shoal.node")
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


def _check_tls_files(s: NodeSettings) -> None:
    """TLS settings a node can use, or the mistake at start (not at each reconnect)."""
    if (s.tls_cert is None) != (s.tls_key is None):
        raise FailedPrecondition("TLS needs both tls_cert and tls_key")
    for path in (s.tls_ca, s.tls_cert, s.tls_key):
        if path is not None:
            path.read_bytes()  # OSError naming it


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


class NodeAgent:
    """A standalone node: `start()`, then `stop()` (idempotent), or `shutdown()` to drain first.

    It runs what its coordinator assigns (its session and lease: `link`, see session.py) and
    what callers of its own service send it directly.
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
        # Set once drained to leave, or refused for good by its coordinator (`refusal`): the
        # process should end.
        self.left = asyncio.Event()
        self.refusal: ShoalError | None = None
        self.draining = False
        self.port = 0
        self.own_addresses = OwnAddresses(0, settings.reachable_at)  # port: once it listens
        self._runs: dict[str, _Run] = {}  # the coordinator's attempts, by task id
        self._direct: dict[str, _Run] = {}  # tasks run for callers of the node's service
        self.direct = DirectTasks()  # what those callers see of them, kept a while
        self.slots = Slots(settings.slots)  # shared by both kinds of run
        self.machine = MachineProbe()  # GPUs, Docker, Ollama: probed at start, now and then after
        self._idle = asyncio.Event()  # set while nothing runs
        self._idle.set()
        self._background: set[asyncio.Task[None]] = set()
        self._drain_task: asyncio.Task[None] | None = None
        self._leaving = False
        self._server: grpc.aio.Server | None = None
        self._health: HealthServicer | None = None
        self._token = ""
        self._ledger = Ledger(settings.ledger, self.node_id)
        self.discovery = NodeDiscovery(settings, self.info)
        self.link = CoordinatorLink(self)  # the session with its coordinator, and the lease
        self.connected = self.link.connected  # set while a session is up
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
        # Told each time the guard turns busy or calm (`shoal up` prints it).
        self.on_guard_change: Callable[[ResourceGuard], object] | None = None

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
        check_token(self._token)
        check_service_access(self.settings, self._token)
        await asyncio.to_thread(_check_tls_files, self.settings)
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
        s = self.settings
        gate = Gate(
            _POLICY,
            self._authenticate if s.auth else None,
            client_certs=s.service_require_client_cert,
        )
        server = grpc.aio.server(options=server_options(_MAX_MESSAGE), interceptors=[gate])
        node_pb2_grpc.add_NodeServicer_to_server(NodeService(self), server)
        self._health = await serve_health(server, tuple(name for name in self.health() if name))
        # Like the coordinator's, for those who hold the node's token (grpcurl, other languages).
        node_service = node_pb2.DESCRIPTOR.services_by_name["Node"].full_name
        serve_reflection(server, (node_service, HEALTH_SERVICE))
        credentials = None
        if s.service_tls and s.tls_cert is not None and s.tls_key is not None:
            credentials = server_credentials(
                s.tls_cert,
                s.tls_key,
                s.tls_ca if s.service_require_client_cert else None,
                s.service_require_client_cert,
            )
        else:
            credentials = None
        self.port = listen(server, s.listen, credentials)
        self.own_addresses.port = self.port
        await server.start()
        self._server = server
        await self.discovery.async_start(self.port)
        # Standalone: it dials no coordinator (one may still attach it).
        self.link.start(dial=not self.settings.standalone)
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
        await self.link.stop()
        for name in ("_drain_task", "_load_task", "_ollama_task"):
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

    def refused(self, err: ShoalError) -> None:
        """Its coordinator refused it for good (see session.py): the process should end."""
        self.refusal = err
        self.left.set()

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
            self.link.heartbeat_soon()
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
        self.link.heartbeat_soon()

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
                await self.link.flushed.wait()
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

    # -- the Ollama server -------------------------------------------------------------------

    async def _look_at_ollama(self, ollama: OllamaExecutor) -> None:
        models, loaded = await asyncio.gather(ollama.models(), ollama.loaded_models())
        if loaded != self._loaded_models:
            self.link.heartbeat_soon()
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
        if self.on_guard_change is not None:
            self.on_guard_change(guard)

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
            self.link.heartbeat_soon()

    # -- the session ----------------------------------------------------------------------

    @property
    def token(self) -> str:
        return self._token

    def running_attempts(self) -> list[node_pb2.RunningAttempt]:
        return [
            node_pb2.RunningAttempt(task_id=r.task_id, attempt=r.attempt)
            for r in self._runs.values()
            if not r.stop
        ]

    def heartbeat(self) -> node_pb2.Heartbeat:
        throttled, floor, paused, reason = self._guard_state()
        return node_pb2.Heartbeat(
            running=len(self._runs),
            free_slots=self.slots.free,  # direct tasks hold slots too
            draining=self.draining,
            throttled=throttled,
            min_priority=floor,  # type: ignore[arg-type]
            paused=paused,
            throttle_reason=reason,
            loaded_models=self._loaded_models,
        )

    def fence(self) -> None:
        runs = [r for r in self._runs.values() if r.task is not None and not r.stop]
        if runs:
            _log.warning(
                "node=%s could not renew its lease: stopping %d tasks", self.node_id, len(runs)
            )
            for run in runs:
                self._stop(run, _Stop.FENCE)

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

    def assigned(self, a: node_pb2.Assignment) -> None:
        if self.draining:
            # Assigned before the coordinator heard of the drain: given back, never started.
            self._ledger.write("release", a.task_id, a.attempt)
            self.link.push(
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
        report = _AttemptReport(a.task_id, a.attempt, self._ledger, self.link.push)
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

    def cancelled(self, c: node_pb2.RunningAttempt) -> None:
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
                    await asyncio.to_thread(self.secrets.resolve, spec.secrets, spec.tenant)
                    if spec.secrets
                    else {}
                )
            except SecretsNotGranted as err:
                # The task asked for what its tenant may not have: its own mistake.
                _log.warning("node=%s task=%s %s", self.node_id, run.task_id, err.message)
                return TaskError(err.message).outcome()
            except MissingSecrets as err:
                # The task's, not the node's: secrets are not advertised, so a task that needs
                # some must be placed (by labels) on nodes that hold them. Counting it against
                # the node would let any submitter open every node's breakers.
                _log.warning("node=%s task=%s %s", self.node_id, run.task_id, err.message)
                return TaskError(f"{err.message} (node {self.node_id})").outcome()
            except InvalidArgument as err:
                return TaskError(err.message).outcome()
            if secret_env:
                redactor = Redactor(secret_env.values())
            run.report.started()
            output = OutputCap(
                run.report.output,
                limit=self.settings.max_output_bytes,
                tail=self.settings.output_tail_bytes,
            )
            ctx = ExecutionContext(
                run.task_id,
                output,
                self.settings.output_tail_bytes,
                secret_env=secret_env,
                redactor=redactor,
                workdir=self.settings.workdir,
                groups=run.groups,
                paced=self.link.output_room if isinstance(run.report, _AttemptReport) else unpaced,
            )
            try:
                if timeout is None:  # nothing to time: no timeout to pause either
                    outcome = await executor.run(spec, ctx)
                else:
                    async with run.deadline.running(timeout):
                        outcome = await executor.run(spec, ctx)
            finally:
                output.close()
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
        except RunFailed as err:
            outcome = err.outcome()  # redacted below, like any other
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
            for stream in ("stdout", "stderr"):
                set_result_text(result, stream, redactor.redact(result_text(result, stream)))
        return outcome
