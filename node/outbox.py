"""The node's outbox: its task updates waiting for a session to carry them, in batches, with
the results a lost session may have lost sent again by the next one. It outlives sessions."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque

from shoal._output import output_size
from shoal.specs import bounded_result
from shoal.v1 import node_pb2

__all__ = ["MAX_BATCH_BYTES", "Outbox"]

_MAX_UPDATES = 10_000
# An update batch, whatever its updates: well under the message limit, so that no update,
# however large, can make the stream fail (and fail again after every reconnect).
MAX_BATCH_BYTES = 4 << 20
# Output waiting to be sent beyond which tasks that print are slowed (see `output_room`).
_OUTPUT_ROOM = 4 << 20
# Attempts a Hello claims at most: a coordinator refuses more (its max_batch by default).
_MAX_CLAIMS = 10_000
RIDE_ALONG = 0.01
"""Seconds a Started update waits for company, and a result whose executor says that others
are about to follow it (pipelined function calls): a task that ends within it is reported in
one update batch, not two, and the results of calls sent together go together (each batch
costs both ends ~100 us; and the coordinator then hands out the slots freed in one group, not
in ever smaller ones). A task that runs on is seen running that much later."""
RIDE_ALONG_MOST = 32
"""Results that wait for those said to follow them at most: the one that makes this many goes
at once with the others, so that the coordinator records them and hands out their slots while
the rest of a long turn of calls still runs (64 slots' calls report in two parts, not one
after the whole turn)."""


class Outbox:
    """Updates in the order they came: `push`, then a session's writer `take`s batches once
    they are `due_at`, and says which were `sent` (or `put_back` what it could not write)."""

    def __init__(self) -> None:
        self._updates: list[node_pb2.TaskUpdate] = []
        self.ready = asyncio.Event()  # set once updates are due (the writer clears it)
        self._timer: asyncio.TimerHandle | None = None  # sets `ready` when they come due
        # When what is held is to be sent (monotonic): at once, unless all of it rides along.
        self._due_at = math.inf
        self._riding = 0  # results held that wait for others said to follow them
        self._output_bytes = 0  # of the output updates held
        self._output_room = asyncio.Event()  # set while that is under _OUTPUT_ROOM
        self._output_room.set()
        self.flushed = asyncio.Event()  # set while every update was written to a stream
        self.flushed.set()
        # Results written to the current stream, each with the first heartbeat written after
        # it: the coordinator applies a stream in order, so the answer to that heartbeat shows
        # it arrived. Until then a lost session (the coordinator killed or stopping) may have
        # lost it, and the next session sends it again.
        self._unacked: deque[tuple[int, node_pb2.TaskUpdate]] = deque()

    def push(self, update: node_pb2.TaskUpdate, *, more_follow: bool = False) -> None:
        """Send an update with the next batch, in this session or the next (a result with
        `more_follow` may wait up to RIDE_ALONG for the results said to follow it)."""
        kind = update.WhichOneof("update")
        if kind == "output":
            if len(self._updates) >= _MAX_UPDATES:
                return  # disconnected for long: output is dropped first, results never
            self._add_output(output_size(update.output))
        elif kind == "finished":
            # Whatever an executor put in it, a result fits in a batch (the coordinator cuts
            # results further to its own limit).
            bounded_result(update.finished.result, MAX_BATCH_BYTES // 2)
        self._updates.append(update)
        due_at = self._due_at
        if kind == "started":  # nobody waits for it: it rides along with the next update
            if not self._riding:
                self._due_at = min(self._due_at, time.monotonic() + RIDE_ALONG)
        elif kind == "finished" and more_follow and self._riding < RIDE_ALONG_MOST - 1:
            # Results about to follow it: it waits for them, and so do the Started updates
            # held (most likely of the same calls).
            if not self._riding and self._due_at > -math.inf:
                self._due_at = time.monotonic() + RIDE_ALONG
            self._riding += 1
        else:
            self._due_at = -math.inf
        if self._due_at < due_at:  # the writer waits for the old time: it is sooner now
            self._wake_at(self._due_at)
        self.flushed.clear()

    @property
    def due_at(self) -> float:
        """When the updates held are to be sent (monotonic; inf when none are held)."""
        return self._due_at

    async def output_room(self) -> None:
        """Return once the outbox holds less than _OUTPUT_ROOM of output: a task printing faster
        than its session carries it waits here (and its pipe fills), rather than growing it."""
        while self._output_bytes >= _OUTPUT_ROOM:
            await self._output_room.wait()

    def take(self) -> tuple[list[node_pb2.TaskUpdate], int]:
        """The next batch, at most MAX_BATCH_BYTES (at least one update), and the bytes of
        output in it."""
        updates = self._updates
        size = output = 0
        end = len(updates)
        for i, update in enumerate(updates):
            size += update.ByteSize()
            if size > MAX_BATCH_BYTES and i:
                end = i
                break
            if update.HasField("output"):
                output += output_size(update.output)
        batch, self._updates = updates[:end], updates[end:]
        self._riding = 0
        # What is left (of a batch cut short) is due already.
        self._due_at = -math.inf if self._updates else math.inf
        self._wake_at(self._due_at)
        self._add_output(-output)
        return batch, output

    def put_back(self, batch: list[node_pb2.TaskUpdate], output: int) -> None:
        """A batch `take` gave that could not be written: first in line for the next session."""
        self._updates[:0] = batch
        self._due_at = -math.inf
        self._wake_at(self._due_at)
        self._add_output(output)

    def sent(self, batch: list[node_pb2.TaskUpdate], heartbeat_seq: int) -> None:
        """`batch` was written before heartbeat `heartbeat_seq`: its results wait for that
        heartbeat's answer."""
        self._unacked.extend((heartbeat_seq, u) for u in batch if u.HasField("finished"))
        if not self._updates:
            self.flushed.set()

    def acked(self, heartbeat_seq: int) -> None:
        """The coordinator answered heartbeat `heartbeat_seq`: what was written before it
        arrived."""
        unacked = self._unacked
        while unacked and unacked[0][0] <= heartbeat_seq:
            unacked.popleft()

    def resend_unacked(self) -> None:
        """The session ended: results it may have lost go out again with the next one."""
        if self._unacked:
            self._updates[:0] = [u for _, u in self._unacked]
            self._unacked.clear()
            self._due_at = -math.inf
            self._wake_at(self._due_at)
            self.flushed.clear()

    def claims(self, running: list[node_pb2.RunningAttempt]) -> list[node_pb2.RunningAttempt]:
        """What Hello claims: the attempts the node still runs, then those whose result has yet
        to reach a coordinator (which records it only for an attempt it lets the node keep)."""
        for update in self._updates:
            if len(running) >= _MAX_CLAIMS:
                break
            if update.HasField("finished"):
                running.append(
                    node_pb2.RunningAttempt(task_id=update.task_id, attempt=update.attempt)
                )
        return running

    def _wake_at(self, due_at: float) -> None:
        """Set `ready` when what is held comes due: now, or at `due_at` (a timer rather than
        waking the writer to wait again: a Started update held for company would cost a turn of
        calls a wake-up of the writer each)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if due_at <= time.monotonic():
            self.ready.set()
        elif due_at < math.inf:
            self._timer = asyncio.get_running_loop().call_at(due_at, self.ready.set)

    def _add_output(self, size: int) -> None:
        self._output_bytes += size
        if self._output_bytes >= _OUTPUT_ROOM:
            self._output_room.clear()
        else:
            self._output_room.set()
