"""The blocking SDK: `Client`, every AsyncClient method, blocking."""

from __future__ import annotations

import asyncio
import builtins
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Mapping
from datetime import timedelta
from types import EllipsisType
from typing import Any, TypeVar

from shoal._client import AsyncClient
from shoal._requests import (
    Timeout,
    execute_request,
    submit_batch_request,
    submit_request,
    wait_request,
    waited,
)
from shoal.errors import ResourceExhausted
from shoal.v1 import admin_pb2, locks_pb2, task_pb2, tasks_pb2, tasks_pb2_grpc

__all__ = ["Client"]

_T = TypeVar("_T")


class Client:
    """The blocking SDK: every AsyncClient method. Task calls (submit, execute, get, wait,
    cancel) are made in the caller's thread; the rest run on a private event loop thread.

    Takes the arguments of AsyncClient.
    """

    def __init__(self, target: str | None = None, **options: Any):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="shoal-client", daemon=True
        )
        self._thread.start()
        self._async: AsyncClient = self._run(_make_async(target, options))
        # Task calls go through a blocking channel in the caller's thread, when there is one:
        # a round trip then costs no hand-off to the loop thread and back.
        self._calls = self._async.calls
        self._channel = self._async.blocking_channel()
        self._tasks = None if self._channel is None else tasks_pb2_grpc.TasksStub(self._channel)

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._async.close())
        if self._channel is not None:
            self._channel.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    @property
    def target(self) -> str:
        return self._async.target

    def _submit(
        self, method: Any, request: Any, *, timeout: float | EllipsisType | None = ...
    ) -> Any:
        """See AsyncClient._submit."""
        while True:
            try:
                return self._calls.blocking(method, request, timeout=timeout)
            except ResourceExhausted as err:
                if not self._async.wait_when_full or err.retry_after is None:
                    raise
                time.sleep(err.retry_after.total_seconds())

    def submit(self, spec: task_pb2.TaskSpec) -> task_pb2.Task:
        if self._tasks is None:
            return self._run(self._async.submit(spec))
        response: tasks_pb2.SubmitResponse = self._submit(self._tasks.Submit, submit_request(spec))
        return response.task

    def execute(self, spec: task_pb2.TaskSpec, *, timeout: Timeout = None) -> task_pb2.Task:
        """See AsyncClient.execute."""
        if self._tasks is None:
            return self._run(self._async.execute(spec, timeout=timeout))
        request, deadline = execute_request(spec, timeout, self._calls.timeout)
        response: tasks_pb2.SubmitResponse = self._submit(
            self._tasks.Submit, request, timeout=deadline
        )
        return waited(response.task, timeout)

    def submit_batch(self, specs: Iterable[task_pb2.TaskSpec]) -> builtins.list[str]:
        if self._tasks is None:
            return self._run(self._async.submit_batch(list(specs)))
        response = self._submit(self._tasks.SubmitBatch, submit_batch_request(specs))
        return list(response.task_ids)

    def get(self, task_id: str) -> task_pb2.Task:
        if self._tasks is None:
            return self._run(self._async.get(task_id))
        task: task_pb2.Task = self._calls.blocking(
            self._tasks.Get, tasks_pb2.GetRequest(task_id=task_id)
        )
        return task

    def wait(self, task_id: str, *, timeout: Timeout = None) -> task_pb2.Task:
        if self._tasks is None:
            return self._run(self._async.wait(task_id, timeout=timeout))
        request, deadline = wait_request(task_id, timeout, self._calls.timeout)
        task: task_pb2.Task = self._calls.blocking(self._tasks.Wait, request, timeout=deadline)
        return waited(task, timeout)

    def wait_with_reasons(
        self, task_id: str, on_pending: Callable[[task_pb2.Task], object], **kwargs: Any
    ) -> task_pb2.Task:
        """See AsyncClient.wait_with_reasons (`on_pending` runs on the client's loop thread)."""
        return self._run(self._async.wait_with_reasons(task_id, on_pending, **kwargs))

    def cancel(self, task_id: str) -> task_pb2.Task:
        if self._tasks is None:
            return self._run(self._async.cancel(task_id))
        task: task_pb2.Task = self._calls.blocking(
            self._tasks.Cancel, tasks_pb2.CancelRequest(task_id=task_id)
        )
        return task

    def list(
        self, *, states: Iterable[int] = (), tenant: str = "", limit: int = 100
    ) -> builtins.list[task_pb2.Task]:
        return self._run(self._async.list(states=list(states), tenant=tenant, limit=limit))

    def nodes(self) -> builtins.list[admin_pb2.NodeStatus]:
        return self._run(self._async.nodes())

    def drain(
        self, node_id: str, *, grace: timedelta = timedelta(seconds=30), leave: bool = False
    ) -> admin_pb2.NodeStatus:
        return self._run(self._async.drain(node_id, grace=grace, leave=leave))

    def undrain(self, node_id: str) -> admin_pb2.NodeStatus:
        return self._run(self._async.undrain(node_id))

    def acquire_lock(
        self,
        name: str,
        *,
        ttl: timedelta,
        wait: timedelta = timedelta(0),
        shared: bool = False,
    ) -> locks_pb2.Lease:
        return self._run(self._async.acquire_lock(name, ttl=ttl, wait=wait, shared=shared))

    def renew_lock(self, lease: locks_pb2.Lease, *, ttl: timedelta) -> locks_pb2.Lease:
        return self._run(self._async.renew_lock(lease, ttl=ttl))

    def release_lock(self, lease: locks_pb2.Lease) -> None:
        self._run(self._async.release_lock(lease))

    def set_quota(self, quota: admin_pb2.Quota) -> admin_pb2.Quota:
        return self._run(self._async.set_quota(quota))

    def quotas(self) -> builtins.list[admin_pb2.Quota]:
        return self._run(self._async.quotas())

    def delete_quota(self, key: str) -> admin_pb2.Quota:
        return self._run(self._async.delete_quota(key))

    def usage(self, key: str = "") -> builtins.list[admin_pb2.KeyUsage]:
        return self._run(self._async.usage(key))

    def create_token(self, request: admin_pb2.CreateTokenRequest) -> admin_pb2.CreateTokenResponse:
        return self._run(self._async.create_token(request))

    def tokens(self, *, include_revoked: bool = False) -> builtins.list[admin_pb2.TokenInfo]:
        return self._run(self._async.tokens(include_revoked=include_revoked))

    def revoke_token(self, name_or_id: str) -> admin_pb2.TokenInfo:
        return self._run(self._async.revoke_token(name_or_id))

    def create_schedule(self, schedule: admin_pb2.Schedule) -> admin_pb2.Schedule:
        return self._run(self._async.create_schedule(schedule))

    def schedules(self) -> builtins.list[admin_pb2.Schedule]:
        return self._run(self._async.schedules())

    def schedule_action(self, action: str, name: str) -> admin_pb2.Schedule:
        return self._run(self._async.schedule_action(action, name))

    def watch(self, **kwargs: Any) -> Iterator[task_pb2.Event]:
        """See AsyncClient.watch."""
        return self._iterate(self._async.watch(**kwargs))

    def run(self, spec: task_pb2.TaskSpec) -> Iterator[task_pb2.Event]:
        """See AsyncClient.run."""
        return self._iterate(self._async.run(spec))

    def call_tool(self, name: str, input: Mapping[str, Any] | None = None, /, **common: Any) -> Any:
        """See AsyncClient.call_tool."""
        return self._run(self._async.call_tool(name, input, **common))

    def _iterate(self, agen: AsyncIterator[_T]) -> Iterator[_T]:
        try:
            while True:
                try:
                    yield self._run(_anext(agen))
                except StopAsyncIteration:
                    return
        finally:
            self._run(_aclose(agen))


async def _make_async(target: str | None, options: dict[str, Any]) -> AsyncClient:
    return AsyncClient(target, **options)


async def _anext(agen: AsyncIterator[_T]) -> _T:
    return await agen.__anext__()


async def _aclose(agen: AsyncIterator[Any]) -> None:
    aclose = getattr(agen, "aclose", None)
    if aclose is not None:
        await aclose()
