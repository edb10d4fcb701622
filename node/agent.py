"""The node's process: its service, health, discovery, the coordinator link, drain and the
resource guard. It decides what the node takes; its runner (runner.py) runs it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Self

import grpc
from grpc_health.v1._async import HealthServicer

from shoal._server import collect_seldom, listen
from shoal._signals import until_signalled
from shoal.auth import check_token
from shoal.config import NodeSettings, read_token
from shoal.errors import ShoalError, Unavailable
from shoal.handshake import OwnAddresses
from shoal.node.direct import DirectTask, check_direct_request
from shoal.node.discovery import NodeDiscovery
from shoal.node.executors.base import (
    Executor,
    available_executors,
)
from shoal.node.fingerprint import MachineProbe
from shoal.node.guard import ForegroundLoad, ResourceGuard, Thresholds
from shoal.node.health import node_health
from shoal.node.info import node_info
from shoal.node.runner import Runner
from shoal.node.secrets import SecretStore
from shoal.node.service import (
    check_service_access,
    check_tls_files,
    node_server,
    service_credentials,
)
from shoal.node.session import CoordinatorLink
from shoal.node.upkeep import follow_offers, refresh_offers, watch_load
from shoal.v1 import node_pb2, task_pb2

__all__ = ["NodeAgent"]

_log = logging.getLogger("shoal.node")
_FLUSH_BEFORE_LEAVING = 5.0  # seconds a leaving node waits for its last updates to go out


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
        self.machine = MachineProbe()  # GPUs, Docker, Ollama: probed at start, now and then after
        self._background: set[asyncio.Task[None]] = set()
        self._drain_task: asyncio.Task[None] | None = None
        self._leaving = False
        self._server: grpc.aio.Server | None = None
        self._health: HealthServicer | None = None
        self._token = ""
        self.discovery = NodeDiscovery(settings, self.info)
        self.link = CoordinatorLink(self)  # the session with its coordinator, and the lease
        self.connected = self.link.connected  # set while a session is up
        self.runner = Runner(
            settings,
            self.node_id,
            self.executors,
            secrets=self.secrets,
            push=self.link.outbox.push,
            output_room=self.link.outbox.output_room,
            pausing=self._pausing,
            on_groups_changed=self._report_guard,
        )
        self.slots = self.runner.slots  # shared by both kinds of run
        self.direct = self.runner.direct  # what callers of the node's service see, kept a while
        # The resource guard: while the machine is busy with its own work, only tasks of
        # `_floor` or higher priority are taken (and background ones paused, by policy).
        self.guard = (
            ResourceGuard(ForegroundLoad(), Thresholds.from_settings(settings))
            if settings.guard
            else None
        )
        self._floor = task_pb2.Priority.Value("PRIORITY_" + settings.guard_min_priority.upper())
        self._load_task: asyncio.Task[None] | None = None
        self._offers_task: asyncio.Task[None] | None = None  # keeps executors' offers current
        self._guard_reported: tuple[bool, int, int, str] = (False, 0, 0, "")
        # Told each time the guard turns busy or calm (`shoal up` prints it).
        self.on_guard_change: Callable[[ResourceGuard], object] | None = None

    def info(self) -> node_pb2.NodeInfo:
        """This node's fingerprint and capabilities."""
        return node_info(self.settings, self.node_id, self.machine.current(), self.executors)

    @property
    def running(self) -> int:
        return self.runner.running

    async def start(self) -> None:
        self._token = await asyncio.to_thread(
            read_token, self.settings.token, self.settings.token_file
        )
        check_token(self._token)
        check_service_access(self.settings, self._token)
        await asyncio.to_thread(check_tls_files, self.settings)
        await self.machine.async_refresh()
        for name, executor in list(self.executors.items()):
            if not await executor.async_available():
                _log.warning(
                    "node=%s executor=%s not available here: not offered", self.node_id, name
                )
                del self.executors[name]
        if await refresh_offers(self.executors.values()):
            self.link.heartbeat_soon()
        if any(e.refreshes for e in self.executors.values()):
            self._offers_task = asyncio.create_task(
                follow_offers(self.executors.values, self.link.heartbeat_soon),
                name="shoal-node-offers",
            )
        server, self._health = await node_server(self, self._token)
        self.port = listen(server, self.settings.listen, service_credentials(self.settings))
        self.own_addresses.port = self.port
        await server.start()
        self._server = server
        await self.discovery.async_start(self.port)
        # Standalone: it dials no coordinator (one may still attach it).
        self.link.start(dial=not self.settings.standalone)
        if self.guard is not None:
            self._load_task = asyncio.create_task(
                watch_load(
                    self.guard,
                    node_id=self.node_id,
                    task_sessions=self.runner.process_groups,
                    on_change=self._load_changed,
                ),
                name="shoal-node-load",
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

    async def __aenter__(self) -> Self:
        await self._start_or_stop()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def run(self) -> None:
        """Serve (starting first unless started) until SIGINT or SIGTERM, or until it leaves
        (drained away, or refused for good: then that refusal is raised); then drain and stop.
        A second signal stops at once."""
        if self._server is None:
            await self._start_or_stop()
        try:
            collect_seldom()
            await until_signalled(done=self.left)
            await self.shutdown()
        finally:
            await self.stop()
        if self.refusal is not None:
            raise self.refusal

    async def _start_or_stop(self) -> None:
        """Start; on failure, stop what did start."""
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop at once: running tasks are killed (the coordinator runs them again)."""
        await self.link.stop()
        for name in ("_drain_task", "_load_task", "_offers_task"):
            task = getattr(self, name)
            setattr(self, name, None)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.runner.async_stop()
        await asyncio.gather(*(e.aclose() for e in self.executors.values()))
        await self.machine.aclose()
        await self.discovery.async_stop()
        server, self._server = self._server, None
        if server is not None:
            await server.stop(1.0)
        self.runner.close()

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
                await self.runner.idle.wait()
        except TimeoutError:
            self.runner.give_back_all()
            await self.runner.idle.wait()
        if not self._leaving:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_FLUSH_BEFORE_LEAVING):
                await self.link.outbox.flushed.wait()
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

    # -- the resource guard (its loop: upkeep.py) ------------------------------------------

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
        if not guard.busy:
            self.runner.resume_all()
        elif pausing:
            self.runner.pause_background()
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
        paused = self.runner.paused()
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
        return self.runner.running_attempts()

    def heartbeat(self) -> node_pb2.Heartbeat:
        throttled, floor, paused, reason = self._guard_state()
        beat = node_pb2.Heartbeat(
            running=self.runner.running,
            free_slots=self.slots.free,  # direct tasks hold slots too
            draining=self.draining,
            throttled=throttled,
            min_priority=floor,  # type: ignore[arg-type]
            paused=paused,
            throttle_reason=reason,
        )
        for executor in self.executors.values():
            executor.offers_now(beat)
        return beat

    def fence(self) -> None:
        self.runner.fence()

    def assigned(self, a: node_pb2.Assignment) -> None:
        if self.draining:
            # Assigned before the coordinator heard of the drain: given back, never started.
            self.runner.give_back_unstarted(a)
        else:
            self.runner.assigned(a)

    def cancelled(self, c: node_pb2.RunningAttempt) -> None:
        self.runner.cancelled(c)

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
        return self.runner.execute(spec, task_id)

    def cancel_direct(self, task_id: str) -> DirectTask:
        """Stop a direct task (NotFound: no such task); its `ended` is set once it has ended."""
        return self.runner.cancel_direct(task_id)
