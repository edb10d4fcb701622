"""One call to a function worker, as the node holds it: its CALL frame, and the frames its
worker sends of it, taken in order by the task that runs it."""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING

from shoal.node.functions.wire import Frame

if TYPE_CHECKING:
    from shoal.node.functions.process import WorkerProcess

__all__ = ["BACKLOG", "REQUEUE", "Call"]

REQUEUE = Frame(-1, 0)
"""Put in a call's frames when its worker died running another call: send it again."""
BACKLOG = 1 << 20
"""Bytes of a call's frames the node holds, not yet taken, beyond which it stops reading its
worker's pipe (the worker then waits on its writes) until it takes them: a function printing
faster than its output is carried cannot grow the node's memory."""


class Call:
    """One call: its CALL frame, and the frames its worker sends of it (None: the worker died
    running it; REQUEUE: the worker died before it ran it), to be taken in order by `next`."""

    __slots__ = (
        "_frames",
        "_queued",
        "_stalled",
        "_waiter",
        "deaths",
        "fast",
        "frame",
        "id",
        "name",
        "recalled",
        "worker",
    )

    def __init__(self, call_id: int, name: str, frame: bytes) -> None:
        self.id = call_id
        self.name = name
        self.frame = frame
        self.worker: WorkerProcess | None = None
        self.fast = False  # whether it was sent as a fast call (it may queue behind others)
        self.recalled = False  # whether its worker was asked to give it back (a stuck worker)
        self.deaths = 0  # its workers that died holding it, with no call to blame
        self._frames: collections.deque[Frame | None] = collections.deque()
        self._waiter: asyncio.Future[Frame | None] | None = None
        self._queued = 0  # bytes of the frames not yet taken
        self._stalled: WorkerProcess | None = None  # a worker not read until they are taken

    def put(self, frame: Frame | None) -> None:
        waiter = self._waiter
        if waiter is not None and not self._frames and not waiter.done():
            self._waiter = None  # it waits for this very frame (most calls): handed over
            waiter.set_result(frame)
            return
        self._frames.append(frame)
        if frame is not None and frame.data:
            self._queued += len(frame.data)
            if self._queued > BACKLOG and self.worker is not None and self._stalled is None:
                self._stalled = self.worker
                self._stalled.pause_reading()

    async def next(self) -> Frame | None:
        """The next frame (waits for it)."""
        if not self._frames:
            waiter: asyncio.Future[Frame | None] = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                return await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():  # handed over as it was cancelled
                    handed = waiter.result()
                    self._frames.appendleft(handed)
                    self._queued += len(handed.data) if handed is not None else 0
                raise
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        frame = self._frames.popleft()
        if frame is not None and frame.data:
            self._queued -= len(frame.data)
            if self._stalled is not None and self._queued <= BACKLOG // 2:
                self._unstall()
        return frame

    def drop(self) -> None:
        """Let go of the frames not taken (its outcome is known without them)."""
        self._frames.clear()
        self._queued = 0
        self._unstall()

    def _unstall(self) -> None:
        if self._stalled is not None:
            self._stalled.resume_reading()
            self._stalled = None
