"""The Tasks service: submit, get, wait, cancel, list and watch tasks."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

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
        since = request.since if request.HasField("since") else None
        async for cursor, events in self._core.watch(
            since=since,
            task_ids=list(request.task_ids),
            output=request.output,
            tenant=request.tenant,
            states=list(request.states),
            by=current_principal(),
        ):
            await self._send(context, tasks_pb2.WatchResponse(events=events, cursor=cursor))

    async def _send(self, context: Ctx, response: tasks_pb2.WatchResponse) -> None:
        """Write a watch's response; a watcher that reads slower than events come is cut once
        what it has yet to read leaves the in-memory log, so that what it holds stays bounded.
        It resumes from its cursor (the SDK's watch does so by itself)."""
        events = self._core.events
        if response.cursor < events.oldest_seq - 1:  # replaying from the store: nothing to lose
            await context.write(response)
            return
        write = asyncio.ensure_future(context.write(response))
        dropped = asyncio.ensure_future(events.wait_dropped(response.cursor))
        try:
            await asyncio.wait((write, dropped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            dropped.cancel()
            cut = not write.done()
            if cut:
                write.cancel()
            # A write given up (or the call gone meanwhile) may still end in the call's error.
            write.add_done_callback(_retrieved)
        if cut and events.closed:  # a watcher that does not read holds no shutdown up
            raise Unavailable(SHUTTING_DOWN)
        if cut:
            self._core.watchers_cut += 1
            raise Unavailable(
                "this watcher fell behind: events it had yet to read left the coordinator's"
                " memory; watch again from the last cursor it received"
            )
        write.result()


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Take a finished task's outcome, so that an error nobody awaits is not logged."""
    if not task.cancelled():
        task.exception()


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
