"""The event log: a global sequence of state changes, published in order, kept in a bounded ring.

Sequence numbers are `(epoch << 40) | counter`, so they keep growing across restarts.
An event whose change must be durable first reserves its number, and is published once
its commit lands; events behind it wait, so subscribers always see numbers in order.

Events are held as `Change`s, a few plain fields each; the Event message a watcher receives
is built from one when first read, so changes nobody watches cost little.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from shoal._output import output_size
from shoal.coordinator.store.base import EPOCH_SHIFT
from shoal.v1 import task_pb2

__all__ = ["EPOCH_SHIFT", "Change", "EventLog"]


class Change:
    """One event: a task's change (its fields as they were then), or a prebuilt Event
    (`Change.of`, for notices and replays). `event()` is the Event message, built once."""

    __slots__ = (
        "_event",
        "epoch",
        "node_id",
        "number",
        "output",
        "principal",
        "result",
        "seq",
        "state",
        "task_id",
        "tenant",
        "time_ns",
    )

    def __init__(
        self,
        task_id: str = "",
        state: int = 0,
        *,
        seq: int = 0,
        node_id: str = "",
        tenant: str = "",
        principal: str = "",
        epoch: int = 0,
        number: int = 0,
        result: task_pb2.TaskResult | None = None,
        output: task_pb2.OutputChunk | None = None,
        time_ns: int = 0,
    ) -> None:
        self.seq = seq
        self.task_id = task_id
        self.state = state
        self.node_id = node_id
        self.tenant = tenant
        self.principal = principal
        self.epoch = epoch
        self.number = number
        self.result = result  # shared, not copied: a final result never changes
        self.output = output
        self.time_ns = time_ns
        self._event: task_pb2.Event | None = None

    @classmethod
    def of(cls, event: task_pb2.Event) -> Change:
        change = cls(
            event.task_id,
            event.state,
            seq=event.seq,
            tenant=event.tenant,
            output=event.output if event.HasField("output") else None,
        )
        change._event = event
        return change

    def event(self) -> task_pb2.Event:
        """The Event message of this change (with its sequence number as it is now)."""
        event = self._event
        if event is None:
            event = self._event = task_pb2.Event(
                task_id=self.task_id,
                state=self.state,  # type: ignore[arg-type]
                node_id=self.node_id,
                tenant=self.tenant,
                principal=self.principal,
                output=self.output,
                result=self.result,
            )
            event.time.FromNanoseconds(self.time_ns)
            if self.number:
                event.attempt.epoch = self.epoch
                event.attempt.number = self.number
        event.seq = self.seq
        return event


class EventLog:
    """Orders, holds and fans out events; watchers read by sequence number.

    It holds at most about `capacity` events and `max_bytes` of output (the oldest go first).
    """

    def __init__(self, epoch: int, *, capacity: int = 100_000, max_bytes: int = 64 << 20) -> None:
        self.first_seq = (epoch << EPOCH_SHIFT) + 1
        self._capacity = capacity
        self._max_bytes = max_bytes
        self.bytes = 0  # of the output held
        self._ring: list[Change | None] = []
        self._base = self.first_seq  # seq of _ring[0]
        self._reserved = self.first_seq - 1  # last number handed out
        self._staged: dict[int, Change | None] = {}
        self._wakeup: asyncio.Future[None] | None = None
        self._dropped: asyncio.Future[None] | None = None  # set when old events are dropped
        self.closed = False  # no more events come: watchers stop waiting

    @property
    def last_seq(self) -> int:
        """The last published sequence number."""
        return self._base + len(self._ring) - 1

    @property
    def oldest_seq(self) -> int:
        """The oldest sequence number still held in memory."""
        return self._base

    def reserve(self) -> int:
        """A number for an event that is published later by `publish` or `abandon`."""
        self._reserved += 1
        return self._reserved

    def emit(self, event: Change, *, size: int = 0) -> None:
        """Number and publish an event at once (behind any reserved one still pending);
        `size`: the bytes of its output."""
        event.seq = self.reserve()
        self.bytes += size
        self.publish((event,))

    def publish(self, events: Iterable[Change]) -> None:
        """Publish events whose numbers came from `reserve`."""
        for event in events:
            self._staged[event.seq] = event
        self._flush()

    def abandon(self, seqs: Iterable[int]) -> None:
        """Give up reserved numbers whose change never committed."""
        for seq in seqs:
            self._staged[seq] = None
        self._flush()

    def _flush(self) -> None:
        staged = self._staged
        nxt = self._base + len(self._ring)
        if nxt not in staged:
            return
        ring = self._ring
        while nxt in staged:
            ring.append(staged.pop(nxt))
            nxt += 1
        if len(ring) > 2 * self._capacity or self.bytes > self._max_bytes:
            self._drop()
        if self._wakeup is not None:
            self._wakeup.set_result(None)
            self._wakeup = None

    def _drop(self) -> None:
        """Drop the oldest events: down to `capacity`, and to 3/4 of `max_bytes` of output."""
        ring = self._ring
        drop = max(0, len(ring) - self._capacity)
        dropped = 0
        for c in ring[:drop]:
            if c is not None and c.output is not None:
                dropped += output_size(c.output)
        if self.bytes - dropped > self._max_bytes:
            goal = self._max_bytes * 3 // 4
            while drop < len(ring) and self.bytes - dropped > goal:
                c = ring[drop]
                if c is not None and c.output is not None:
                    dropped += output_size(c.output)
                drop += 1
        del ring[:drop]
        self._base += drop
        self.bytes -= dropped
        if self._dropped is not None:
            self._dropped.set_result(None)
            self._dropped = None

    def after(self, seq: int, limit: int | None = None) -> list[Change | None] | None:
        """Published events after `seq` (None marks an abandoned number), at most `limit`;
        None if no longer held."""
        if seq + 1 < self._base:
            return None
        start = seq + 1 - self._base
        return self._ring[start : None if limit is None else start + limit]

    def on_forgotten(self, seq: int, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` once the event after `seq` is no longer held, or the log is closed
        (at once if it is already); returns what stops that. No task of its own: a watcher
        arms it for each write (Watch writes thousands a second)."""
        armed: asyncio.Future[None] | None = None
        stopped = False

        def look(_: object = None) -> None:
            nonlocal armed
            if stopped:  # a drop that came as it stopped
                return
            if seq + 1 < self._base or self.closed:
                armed = None
                callback()
                return
            if self._dropped is None:
                self._dropped = asyncio.get_running_loop().create_future()
            armed = self._dropped
            armed.add_done_callback(look)

        def stop() -> None:
            nonlocal stopped
            stopped = True
            if armed is not None:
                armed.remove_done_callback(look)

        look()
        return stop

    def close(self) -> None:
        """No more events come (shutdown): every `wait_after` returns and every `on_forgotten`
        calls back, now and from now on."""
        self.closed = True
        if self._wakeup is not None:
            self._wakeup.set_result(None)
            self._wakeup = None
        if self._dropped is not None:
            self._dropped.set_result(None)
            self._dropped = None

    async def wait_after(self, seq: int) -> None:
        """Return once an event after `seq` is published, or the log is closed."""
        while self.last_seq <= seq and not self.closed:
            if self._wakeup is None:
                self._wakeup = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._wakeup)
