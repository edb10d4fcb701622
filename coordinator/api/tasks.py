"""The Tasks service: submit, get, wait, cancel, list and watch tasks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta

from shoal._gate import current_principal
from shoal.coordinator.api.context import Ctx, client_of
from shoal.coordinator.engine import SHUTTING_DOWN, Coordinator
from shoal.errors import InvalidArgument, Unavailable
from shoal.specs import duration, instant
from shoal.v1 import task_pb2, tasks_pb2, tasks_pb2_grpc

__all__ = ["TasksService"]


class TasksService(tasks_pb2_grpc.TasksServicer):
    def __init__(self, core: Coordinator) -> None:
        self._core = core

    async def Submit(
        self, request: tasks_pb2.SubmitRequest, context: Ctx
    ) -> tasks_pb2.SubmitResponse:
        by = current_principal()
        # Checked before anything is stored: a bad wait_timeout changes nothing.
        timeout = _timeout(request, "wait_timeout")
        if timeout is not None and not request.wait:
            raise InvalidArgument("wait_timeout is the bound of a wait: set wait too")
        (done,) = await self._core.submit(
            [request.spec],
            single=True,
            by=by,
            request_id=request.request_id,
            client=client_of(context),
        )
        if request.wait:
            task = await self._core.wait(done.task_id, timeout, by=by)
        else:
            task = await self._core.get(done.task_id, by=by)
        return tasks_pb2.SubmitResponse(task=task, created=done.created)

    async def SubmitBatch(
        self, request: tasks_pb2.SubmitBatchRequest, context: Ctx
    ) -> tasks_pb2.SubmitBatchResponse:
        done = await self._core.submit(
            request.specs,
            by=current_principal(),
            request_id=request.request_id,
            client=client_of(context),
        )
        seqs = [d.seq for d in done if d.created]
        return tasks_pb2.SubmitBatchResponse(
            task_ids=[d.task_id for d in done],
            created=[d.created for d in done],
            first_seq=min(seqs) if seqs else 0,
        )

    async def Get(self, request: tasks_pb2.GetRequest, context: Ctx) -> task_pb2.Task:
        return await self._core.get(
            request.task_id, by=current_principal(), dependents=request.include_dependents
        )

    async def Wait(self, request: tasks_pb2.WaitRequest, context: Ctx) -> task_pb2.Task:
        timeout = _timeout(request, "timeout")
        return await self._core.wait(request.task_id, timeout, by=current_principal())

    async def Cancel(self, request: tasks_pb2.CancelRequest, context: Ctx) -> task_pb2.Task:
        return await self._core.cancel(request.task_id, by=current_principal())

    async def List(self, request: tasks_pb2.ListRequest, context: Ctx) -> tasks_pb2.ListResponse:
        tasks, token = await self._core.list_tasks(
            states=list(request.states),
            tenant=request.tenant,
            limit=request.limit,
            page_token=request.page_token,
            by=current_principal(),
            executor=request.executor,
            labels=dict(request.labels),
            created_after=_seconds(request, "created_after"),
            created_before=_seconds(request, "created_before"),
        )
        return tasks_pb2.ListResponse(tasks=tasks, next_page_token=token)

    # It writes through the context rather than yielding: a write can then be given up.
    async def Watch(self, request: tasks_pb2.WatchRequest, context: Ctx) -> None:  # type: ignore[override]
        await self.follow(request, context.write)

    def watch_events(
        self, request: tasks_pb2.WatchRequest
    ) -> AsyncIterator[tuple[int, list[task_pb2.Event]]]:
        """What Watch sends, as (cursor, events), for the caller acting now."""
        return self._core.watch(
            since=request.since if request.HasField("since") else None,
            task_ids=list(request.task_ids),
            output=request.output,
            tenant=request.tenant,
            states=list(request.states),
            by=current_principal(),
        )

    async def follow(
        self,
        request: tasks_pb2.WatchRequest,
        write: Callable[[tasks_pb2.WatchResponse], Awaitable[None]],
        *,
        until: Callable[[int], bool] | None = None,
    ) -> None:
        """Watch: each response to `write`; a watcher that reads slower than events come is
        cut once what it has yet to read leaves the in-memory log, so that what it holds
        stays bounded. It resumes from its cursor (the SDK's watch does so by itself).
        With `until`, it returns once `until(cursor)` is true after a write."""
        async for cursor, events in self.watch_events(request):
            await self._send(write, tasks_pb2.WatchResponse(events=events, cursor=cursor))
            if until is not None and until(cursor):
                return

    def forgotten(self, cursor: int) -> bool:
        """Whether the event after `cursor` left the in-memory log: a watcher that has yet to
        send what comes after `cursor` fell behind."""
        return cursor + 1 < self._core.events.oldest_seq

    def fell_behind(self) -> Unavailable:
        """The error that cuts a watcher that reads too slowly (counted)."""
        if self._core.events.closed:  # a watcher that does not read holds no shutdown up
            return Unavailable(SHUTTING_DOWN)
        self._core.watchers_cut += 1
        return Unavailable(
            "this watcher fell behind: events it had yet to read left the coordinator's"
            " memory; watch again from the last cursor it received"
        )

    async def _send(
        self,
        write: Callable[[tasks_pb2.WatchResponse], Awaitable[None]],
        response: tasks_pb2.WatchResponse,
    ) -> None:
        events = self._core.events
        if response.cursor < events.oldest_seq - 1:  # replaying from the store: nothing to lose
            await write(response)
            return
        # A write that waits on a reader too slow for the log is given up once the events
        # after it leave the log: the deadline comes then.
        try:
            async with asyncio.timeout(None) as deadline:
                stop = events.on_forgotten(response.cursor, lambda: deadline.reschedule(0))
                try:
                    await write(response)
                finally:
                    stop()
        except TimeoutError:
            if not deadline.expired():
                raise  # the write's own
            raise self.fell_behind() from None


def _seconds(request: tasks_pb2.ListRequest, name: str) -> float | None:
    """A timestamp field of `request` in seconds since the epoch; None when unset."""
    if not request.HasField(name):  # type: ignore[arg-type]
        return None
    return instant(getattr(request, name), name)


def _timeout(
    request: tasks_pb2.WaitRequest | tasks_pb2.SubmitRequest, name: str
) -> timedelta | None:
    """A wait's bound from its Duration field `name`; None (no bound) when unset."""
    if not request.HasField(name):  # type: ignore[arg-type]
        return None
    return duration(getattr(request, name), name)
