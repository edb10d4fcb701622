"""A connected node's session as the coordinator holds it: its slots, its tasks, its outbox."""

from __future__ import annotations

import asyncio
import math
import secrets
from dataclasses import dataclass
from datetime import timedelta

from google.protobuf.duration_pb2 import Duration

from shoal.auth import Principal
from shoal.coordinator.gates.ratelimit import TokenBucket
from shoal.coordinator.placement import node_slots_of
from shoal.coordinator.records import TaskRecord
from shoal.specs import printable, timestamp
from shoal.v1 import admin_pb2, node_pb2, task_pb2

__all__ = ["MAX_BATCH_BYTES", "MAX_PENDING_CANCELS", "MAX_UNREAD_BYTES", "NodeSession", "Pace"]

_REASON = 200  # characters kept of why a node says it is throttled

MAX_PENDING_CANCELS = 10_000
"""Bounds what a node that floods updates for unknown attempts can make the coordinator hold."""
MAX_BATCH_BYTES = 4 << 20
"""An assignment batch is cut here, well under the message limit, whatever its specs weigh."""
MAX_UNREAD_BYTES = 64 << 20
"""The specs sent to a node that it has said nothing of yet (no update of their tasks): beyond
this it is sent no more until it has. A node that does not read its stream would otherwise
pin a copy of every task it has slots for (its slots x the largest spec, twice over)."""


@dataclass(frozen=True, slots=True)
class Pace:
    """How often a node heartbeats, and how long its lease runs from a renewal (seconds)."""

    interval: float
    lease: float

    def fill(self, interval: Duration, lease: Duration) -> None:
        interval.FromTimedelta(timedelta(seconds=self.interval))
        lease.FromTimedelta(timedelta(seconds=self.lease))


class NodeSession:
    """One node's stream: what it runs, and the messages waiting to be sent to it."""

    def __init__(
        self,
        info: node_pb2.NodeInfo,
        peer: str,
        principal: Principal,
        bucket: TokenBucket,
        *,
        now: float,
        wall: float,
        pace: Pace,
        adopted: bool = False,
    ) -> None:
        self.id = secrets.token_hex(8)
        self.adopted = adopted  # the coordinator dialled the node (Node.Attach)
        self.info = info
        self.peer = peer
        self.principal = principal  # who opened it: its updates are recorded under this name
        self.bucket = bucket  # bounds the messages read from it per second
        self.throttled = 0  # messages that had to wait for the bucket
        self.stale_updates = 0  # updates for attempts no longer its own (fenced off)
        self.draining = False
        # Its resource guard, from its heartbeats: while its machine is busy it takes only
        # `min_priority` or higher (0: every priority), and `paused` of its tasks are stopped.
        self.throttled_by_load = False
        self.min_priority = 0
        self.paused = 0
        self.throttle_reason = ""
        self.slots = node_slots_of(info)
        self.loaded_models = list(info.loaded_models)  # as its last heartbeat said
        self.inflight: dict[str, TaskRecord] = {}
        self.last_seen = now  # monotonic
        self.connected_at = wall
        self.closed = False
        self.ended = asyncio.Event()  # set once closed
        self._assignments: list[node_pb2.Assignment] = []
        self.assigned_bytes = 0  # of the specs in `_assignments` (the dispatcher adds them)
        self._unread: dict[str, int] = {}  # task id -> bytes of its spec, sent, not spoken of
        self._unread_bytes = 0
        # Keyed by task: a node repeating updates of a stale attempt is told to stop it once.
        self._cancels: dict[str, node_pb2.RunningAttempt] = {}
        self.pace = pace  # as the node was last told
        self._lease: int | None = None  # the heartbeat to acknowledge
        self._acked_at = -math.inf  # when the last one was (monotonic)
        self._tell_pace = False  # the next acknowledgement carries the pace
        self._drain: node_pb2.Drain | None = None
        self._wake = asyncio.Event()

    @property
    def node_id(self) -> str:
        return self.info.node_id

    @property
    def behind(self) -> bool:
        """Whether it has more of the specs sent to it unread than MAX_UNREAD_BYTES."""
        return self._unread_bytes > MAX_UNREAD_BYTES

    def sent(self, task_id: str, size: int) -> bool:
        """Note a task's spec (`size` bytes) sent to it; whether it is now `behind`."""
        self._unread[task_id] = size
        self._unread_bytes += size
        if self._unread_bytes <= MAX_UNREAD_BYTES:
            return False
        for gone in [t for t in self._unread if t not in self.inflight]:  # ended meanwhile
            self._unread_bytes -= self._unread.pop(gone)
        return self.behind

    def read(self, task_id: str) -> bool:
        """It spoke of a task (so it read it); whether it is no longer `behind` by that."""
        size = self._unread.pop(task_id, None)
        if size is None:
            return False
        was = self.behind
        self._unread_bytes -= size
        return was and not self.behind

    def assign(self, assignments: list[node_pb2.Assignment]) -> None:
        self._assignments += assignments
        self._wake.set()

    def cancel(self, task_id: str, attempt: task_pb2.AttemptId) -> None:
        """Tell the node to stop an attempt; beyond MAX_PENDING_CANCELS unsent ones, dropped."""
        if len(self._cancels) < MAX_PENDING_CANCELS or task_id in self._cancels:
            self._cancels[task_id] = node_pb2.RunningAttempt(task_id=task_id, attempt=attempt)
            self._wake.set()

    def renew(self, seq: int, now: float, pace: Pace) -> None:
        """Acknowledge a heartbeat, unless the last answer went out less than a quarter lease
        ago: the node's lease runs again from when it sent the one acknowledged. Answering
        every other heartbeat or so halves what idle sessions cost and leaves its lease ample
        room.

        A slower `pace` is told the node with the answer. It never speeds up within a session:
        a node not yet told a shorter lease would outlive the one the coordinator counts.
        """
        if pace.interval > self.pace.interval:
            self.pace = pace
            self._tell_pace = True
        elif now - self._acked_at < self.pace.lease / 4:
            return
        self._acked_at = now
        self._lease = seq
        self._wake.set()

    def note_load(self, hb: node_pb2.Heartbeat) -> bool:
        """Take the resource guard's state from a heartbeat; returns whether it changed.

        A throttled node that names no floor takes NORMAL or higher (unspecified is NORMAL).
        """
        floor = (hb.min_priority or task_pb2.PRIORITY_NORMAL) if hb.throttled else 0
        state = (hb.throttled, floor, hb.paused)
        if state == (self.throttled_by_load, self.min_priority, self.paused):
            return False
        self.throttled_by_load, self.min_priority, self.paused = state
        self.throttle_reason = printable(hb.throttle_reason, _REASON) if hb.throttled else ""
        return True

    @property
    def busy_because(self) -> str:
        """Why it takes no lower priority now: `its machine is busy (cpu 93% > 70%)`."""
        if not self.throttled_by_load:
            return ""
        return "its machine is busy" + (
            f" ({self.throttle_reason})" if self.throttle_reason else ""
        )

    def notice(self) -> task_pb2.NodeNotice:
        """Its resource guard's state, for watchers."""
        return task_pb2.NodeNotice(
            node_id=self.node_id,
            throttled=self.throttled_by_load,
            min_priority=self.min_priority,  # type: ignore[arg-type]
            paused=self.paused,
            reason=self.throttle_reason,
        )

    def status(
        self,
        *,
        now: float,
        wall: float,
        breakers: list[task_pb2.Breaker],
        health: admin_pb2.NodeHealth.ValueType,
    ) -> admin_pb2.NodeStatus:
        """What ListNodes shows of it; `now` is monotonic, `wall` the same moment's wall time."""
        return admin_pb2.NodeStatus(
            info=self.info,
            connected=True,
            running=self.slots.running,
            free_slots=max(0, self.slots.free),
            connected_at=timestamp(self.connected_at),
            last_seen=timestamp(wall - (now - self.last_seen)),
            address=self.peer,
            throttled=self.throttled,
            draining=self.draining,
            stale_updates=self.stale_updates,
            breakers=breakers,
            throttled_by_load=self.throttled_by_load,
            min_priority=self.min_priority,  # type: ignore[arg-type]
            paused=self.paused,
            throttle_reason=self.throttle_reason,
            health=health,
            adopted=self.adopted,
        )

    def drain(self, drain: node_pb2.Drain) -> None:
        self._drain = drain
        self._wake.set()

    def close(self) -> None:
        """End the session: the stream's writer sees it and returns."""
        self.closed = True
        self.ended.set()
        self._wake.set()

    def _assignment_batches(self) -> list[list[node_pb2.Assignment]]:
        """The assignments to send, in batches of at most MAX_BATCH_BYTES (one at least)."""
        if self.assigned_bytes + 300 * len(self._assignments) <= MAX_BATCH_BYTES:
            return [self._assignments]  # the common case: no size taken one by one
        batches: list[list[node_pb2.Assignment]] = [[]]
        size = 0
        for a in self._assignments:
            n = a.ByteSize()
            if size + n > MAX_BATCH_BYTES and batches[-1]:
                batches.append([])
                size = 0
            batches[-1].append(a)
            size += n
        return batches

    async def outgoing(self) -> list[node_pb2.CoordinatorMessage] | None:
        """The next messages to send, batched; None once the session is closed."""
        while not self.closed:
            if (
                self._assignments
                or self._cancels
                or self._lease is not None
                or self._drain is not None
            ):
                out: list[node_pb2.CoordinatorMessage] = []
                if self._drain is not None:
                    out.append(node_pb2.CoordinatorMessage(drain=self._drain))
                    self._drain = None
                if self._cancels:
                    out.append(
                        node_pb2.CoordinatorMessage(
                            cancels=node_pb2.CancelBatch(attempts=self._cancels.values())
                        )
                    )
                    self._cancels = {}
                if self._assignments:
                    for batch in self._assignment_batches():
                        out.append(
                            node_pb2.CoordinatorMessage(
                                assignments=node_pb2.AssignmentBatch(assignments=batch)
                            )
                        )
                    self._assignments = []
                    self.assigned_bytes = 0
                if self._lease is not None:
                    renewed = node_pb2.LeaseRenewed(seq=self._lease)
                    if self._tell_pace:
                        self.pace.fill(renewed.heartbeat_interval, renewed.lease)
                        self._tell_pace = False
                    out.append(node_pb2.CoordinatorMessage(lease=renewed))
                    self._lease = None
                return out
            self._wake.clear()
            await self._wake.wait()
        return None
