"""Every event of a coordinator, recorded from sequence 0 on, across its restarts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection

from shoal import AsyncClient, ShoalError
from shoal.specs import is_final
from shoal.v1 import task_pb2
from tests.integration.harness import eventually

__all__ = ["EventRecorder", "replay"]


class EventRecorder:
    """Every event of a coordinator from sequence 0 on (`async with`), across its restarts.

    The SDK's watch reconnects by itself and resumes where it was; should it end with an
    error anyway, the recorder counts an interruption and watches again from its last event.
    """

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self.events: dict[int, task_pb2.Event] = {}
        self.finished: set[str] = set()  # tasks with a final event
        self.interruptions = 0
        self._durable_seq = 0  # the last outcome: outcomes replay at any age
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> EventRecorder:
        self._task = asyncio.create_task(self._follow(), name="chaos-event-recorder")
        return self

    async def __aexit__(self, *exc: object) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def durable_seq(self) -> int:
        """The sequence number of the last outcome recorded (a replay from 0 reaches it)."""
        return self._durable_seq

    async def _follow(self) -> None:
        cursor = 0
        while True:
            events = self._client.watch(since=cursor)
            try:
                async with contextlib.aclosing(events):
                    async for event in events:
                        self._add(event)
                        cursor = max(cursor, event.seq)
            except ShoalError:
                self.interruptions += 1
                await asyncio.sleep(0.1)  # a pause before watching again, not a wait on a state

    def _add(self, event: task_pb2.Event) -> None:
        self.events[event.seq] = event
        if event.task_id and not event.HasField("output") and is_final(event.state):
            self.finished.add(event.task_id)
            self._durable_seq = max(self._durable_seq, event.seq)

    def select(self, keep: Callable[[task_pb2.Event], bool]) -> list[task_pb2.Event]:
        """Recorded events that `keep` accepts, in sequence order."""
        return [e for _, e in sorted(self.events.items()) if keep(e)]

    async def wait_for(
        self, keep: Callable[[task_pb2.Event], bool], *, timeout: float
    ) -> task_pb2.Event:
        """The first recorded event `keep` accepts, once there is one."""

        def found() -> task_pb2.Event:
            matches = self.select(keep)
            assert matches, "no such event yet"
            return matches[0]

        return await eventually(found, timeout=timeout, interval=0.05)

    async def wait_final(self, ids: Collection[str], *, timeout: float) -> None:
        """Return once every task of `ids` has a final event."""

        def all_final() -> None:
            missing = len(set(ids) - self.finished)
            assert not missing, f"{missing} of {len(ids)} tasks not final"

        await eventually(all_final, timeout=timeout, interval=0.1)


async def replay(
    client: AsyncClient, *, through: int, timeout: float = 30.0
) -> list[task_pb2.Event]:
    """A fresh Watch from sequence 0, read up to the event numbered `through` (or past it)."""
    out: list[task_pb2.Event] = []
    if not through:
        return out
    events = client.watch(since=0)
    async with asyncio.timeout(timeout), contextlib.aclosing(events):
        async for event in events:
            out.append(event)
            if event.seq >= through:
                break
    return out
