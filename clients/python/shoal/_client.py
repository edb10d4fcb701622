"""The Python SDK: AsyncClient over grpc.aio, and Client, its blocking twin."""

from __future__ import annotations

import asyncio
import builtins
import functools
import logging
import uuid
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from datetime import timedelta
from pathlib import Path
from types import EllipsisType
from typing import Any

import grpc
from google.protobuf import json_format

from shoal._builders import tool
from shoal._calls import Calls
from shoal._channel import CLIENT_KEY, bearer, open_blocking_channel, open_channel
from shoal._requests import (
    Timeout,
    execute_request,
    submit_batch_request,
    submit_request,
    wait_request,
    waited,
)
from shoal._status import from_rpc_error
from shoal.config import ClientSettings, coordinator_target, local_token_hint, read_token
from shoal.errors import ResourceExhausted, TaskFailed, Unavailable
from shoal.specs import is_final, to_duration
from shoal.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    locks_pb2,
    locks_pb2_grpc,
    task_pb2,
    tasks_pb2,
    tasks_pb2_grpc,
)

__all__ = ["AsyncClient"]

_log = logging.getLogger("shoal")
_MAX_MESSAGE = 64 << 20


class AsyncClient:
    """Talks to a coordinator. Errors arrive as `shoal.errors` exceptions.

    What is not given comes from ClientSettings (config file, `SHOAL_*` variables); the token
    falls back to the local admin token that `shoal up` wrote. With `wait_when_full`, a submit
    the coordinator refuses for backpressure waits the delay it names and tries again.

    Calls that are safe to repeat are resent with backoff while the coordinator is unavailable
    (restarting, unreachable), for up to `retry_for`. Submits are among them: each carries a
    request id, so a submit whose answer was lost is resent without creating a second task.
    Until the client has reached the coordinator once, it tries for `connect_for` only, then
    raises Unavailable naming the address: a wrong address is not worth waiting on.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        token: str | None = None,
        tls_ca: Path | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        timeout: timedelta = timedelta(seconds=30),
        wait_when_full: bool = False,
        retry_for: timedelta = timedelta(seconds=30),
        connect_for: timedelta = timedelta(seconds=3),
    ):
        settings = ClientSettings()
        self._wait_when_full = wait_when_full
        self.target = coordinator_target(target or settings.coordinator)
        hint = ""
        if token is None:
            token = read_token(settings.token, settings.token_file)
            if not settings.token and settings.token_file is None:
                hint = local_token_hint(token)
        self._calls = Calls(
            self.target,
            # A name for this client, so that a coordinator that is full keeps its place in
            # line between its tries.
            (*bearer(token), (CLIENT_KEY, uuid.uuid4().hex)),
            timeout=timeout.total_seconds(),
            retry_for=retry_for.total_seconds(),
            connect_for=connect_for.total_seconds(),
            token_hint=hint,
        )
        self._dial: dict[str, Any] = {
            "max_message_bytes": _MAX_MESSAGE,
            "tls_ca": tls_ca or settings.tls_ca,
            "tls_cert": tls_cert or settings.tls_cert,
            "tls_key": tls_key or settings.tls_key,
        }
        self._channel = open_channel(self.target, **self._dial)
        self._tasks = tasks_pb2_grpc.TasksStub(self._channel)
        self._admin = admin_pb2_grpc.AdminStub(self._channel)
        self._locks = locks_pb2_grpc.LocksStub(self._channel)

    @property
    def calls(self) -> Calls:
        """How this client calls its coordinator (shared with Client's blocking calls)."""
        return self._calls

    @property
    def wait_when_full(self) -> bool:
        return self._wait_when_full

    def blocking_channel(self) -> grpc.Channel | None:
        """A blocking channel to the same coordinator, dialled the same way (None: there is
        none for a list of coordinators over TLS)."""
        return open_blocking_channel(self.target, **self._dial)

    async def _submit(
        self, method: Any, request: Any, *, timeout: float | EllipsisType | None = ...
    ) -> Any:
        """A submit; refused for backpressure, nothing was stored, so it may simply be resent."""
        while True:
            try:
                return await self._calls.unary(method, request, timeout=timeout)
            except ResourceExhausted as err:
                if not self._wait_when_full or err.retry_after is None:
                    raise
                await asyncio.sleep(err.retry_after.total_seconds())

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def submit(self, spec: task_pb2.TaskSpec) -> task_pb2.Task:
        """Submit one task; returns it as stored (an existing one when its key matched)."""
        response: tasks_pb2.SubmitResponse = await self._submit(
            self._tasks.Submit, submit_request(spec)
        )
        return response.task

    async def execute(self, spec: task_pb2.TaskSpec, *, timeout: Timeout = None) -> task_pb2.Task:
        """Submit one task and wait for it to end, in one call: the task once final. With
        `timeout`, raises WaitTimeout (holding the task as it is then) if it has not ended by
        then; the task stays submitted."""
        request, deadline = execute_request(spec, timeout, self._calls.timeout)
        response: tasks_pb2.SubmitResponse = await self._submit(
            self._tasks.Submit, request, timeout=deadline
        )
        return waited(response.task, timeout)

    async def submit_batch(self, specs: Iterable[task_pb2.TaskSpec]) -> list[str]:
        """Submit many tasks atomically in one call; returns their ids in order."""
        response = await self._submit(self._tasks.SubmitBatch, submit_batch_request(specs))
        return list(response.task_ids)

    async def get(self, task_id: str) -> task_pb2.Task:
        task: task_pb2.Task = await self._calls.unary(
            self._tasks.Get, tasks_pb2.GetRequest(task_id=task_id)
        )
        return task

    async def wait(self, task_id: str, *, timeout: Timeout = None) -> task_pb2.Task:
        """The task once final. With `timeout`, raises WaitTimeout (holding the task as it is
        then) if it has not ended by then."""
        request, deadline = wait_request(task_id, timeout, self._calls.timeout)
        task: task_pb2.Task = await self._calls.unary(self._tasks.Wait, request, timeout=deadline)
        return waited(task, timeout)

    async def wait_with_reasons(
        self,
        task_id: str,
        on_pending: Callable[[task_pb2.Task], object],
        *,
        after: timedelta = timedelta(seconds=2),
        every: timedelta = timedelta(seconds=1),
    ) -> task_pb2.Task:
        """The task once final. Once it has waited `after`, `on_pending(task)` is called each
        time why it waits (its `pending_reason`, looked at every `every`) changes."""
        told = ""
        slice_ = after
        while True:
            request = tasks_pb2.WaitRequest(task_id=task_id)
            request.timeout.CopyFrom(to_duration(slice_))
            deadline = slice_.total_seconds() + self._calls.timeout
            task: task_pb2.Task = await self._calls.unary(
                self._tasks.Wait, request, timeout=deadline
            )
            if is_final(task.state):
                return task
            if task.pending_reason != told:
                told = task.pending_reason
                if told:
                    on_pending(task)
            slice_ = every

    async def cancel(self, task_id: str) -> task_pb2.Task:
        task: task_pb2.Task = await self._calls.unary(
            self._tasks.Cancel, tasks_pb2.CancelRequest(task_id=task_id)
        )
        return task

    async def list(
        self, *, states: Iterable[int] = (), tenant: str = "", limit: int = 100
    ) -> builtins.list[task_pb2.Task]:
        """Up to `limit` tasks, newest first."""
        out: builtins.list[task_pb2.Task] = []
        token = ""
        while len(out) < limit:
            request = tasks_pb2.ListRequest(
                states=list(states),  # type: ignore[arg-type]
                tenant=tenant,
                limit=min(1000, limit - len(out)),
                page_token=token,
            )
            page = await self._calls.unary(self._tasks.List, request)
            out += page.tasks
            token = page.next_page_token
            if not token:
                break
        return out[:limit]

    async def nodes(self) -> builtins.list[admin_pb2.NodeStatus]:
        response = await self._calls.unary(self._admin.ListNodes, admin_pb2.ListNodesRequest())
        return list(response.nodes)

    async def drain(
        self, node_id: str, *, grace: timedelta = timedelta(seconds=30), leave: bool = False
    ) -> admin_pb2.NodeStatus:
        """Take a node out of service (admin): see `shoal drain`."""
        request = admin_pb2.DrainRequest(node_id=node_id, grace=to_duration(grace), leave=leave)
        status: admin_pb2.NodeStatus = await self._calls.unary(self._admin.Drain, request)
        return status

    async def undrain(self, node_id: str) -> admin_pb2.NodeStatus:
        status: admin_pb2.NodeStatus = await self._calls.unary(
            self._admin.Undrain, admin_pb2.DrainRequest(node_id=node_id)
        )
        return status

    async def acquire_lock(
        self,
        name: str,
        *,
        ttl: timedelta,
        wait: timedelta = timedelta(0),
        shared: bool = False,
    ) -> locks_pb2.Lease:
        """Lease a mesh-wide lock (tasks declaring it wait meanwhile); FailedPrecondition if
        it is still held after `wait`. Pass `lease.token` to what it guards (fencing)."""
        request = locks_pb2.AcquireRequest(
            name=name, ttl=to_duration(ttl), wait=to_duration(wait), shared=shared
        )
        lease: locks_pb2.Lease = await self._calls.unary(
            self._locks.Acquire,
            request,
            timeout=wait.total_seconds() + self._calls.timeout,
            retry=False,
        )
        return lease

    async def renew_lock(self, lease: locks_pb2.Lease, *, ttl: timedelta) -> locks_pb2.Lease:
        request = locks_pb2.RenewRequest(name=lease.name, token=lease.token, ttl=to_duration(ttl))
        renewed: locks_pb2.Lease = await self._calls.unary(self._locks.Renew, request)
        return renewed

    async def release_lock(self, lease: locks_pb2.Lease) -> None:
        request = locks_pb2.ReleaseRequest(name=lease.name, token=lease.token)
        await self._calls.unary(self._locks.Release, request, retry=False)

    async def set_quota(self, quota: admin_pb2.Quota) -> admin_pb2.Quota:
        """Set the limits on a quota key (admin), replacing any it had."""
        made: admin_pb2.Quota = await self._calls.unary(self._admin.SetQuota, quota)
        return made

    async def quotas(self) -> builtins.list[admin_pb2.Quota]:
        response = await self._calls.unary(self._admin.ListQuotas, admin_pb2.ListQuotasRequest())
        return list(response.quotas)

    async def delete_quota(self, key: str) -> admin_pb2.Quota:
        gone: admin_pb2.Quota = await self._calls.unary(
            self._admin.DeleteQuota, admin_pb2.QuotaRef(key=key), retry=False
        )
        return gone

    async def usage(self, key: str = "") -> builtins.list[admin_pb2.KeyUsage]:
        """What each quota key (or `key`) used per day and month, and runs now."""
        response = await self._calls.unary(self._admin.GetUsage, admin_pb2.UsageRequest(key=key))
        return list(response.usage)

    async def create_token(
        self, request: admin_pb2.CreateTokenRequest
    ) -> admin_pb2.CreateTokenResponse:
        """Create an API token (admin); the response holds its secret, shown only then."""
        made: admin_pb2.CreateTokenResponse = await self._calls.unary(
            self._admin.CreateToken, request, retry=False
        )
        return made

    async def tokens(self, *, include_revoked: bool = False) -> builtins.list[admin_pb2.TokenInfo]:
        response = await self._calls.unary(
            self._admin.ListTokens, admin_pb2.ListTokensRequest(include_revoked=include_revoked)
        )
        return list(response.tokens)

    async def revoke_token(self, name_or_id: str) -> admin_pb2.TokenInfo:
        info: admin_pb2.TokenInfo = await self._calls.unary(
            self._admin.RevokeToken, admin_pb2.RevokeTokenRequest(token=name_or_id), retry=False
        )
        return info

    async def create_schedule(self, schedule: admin_pb2.Schedule) -> admin_pb2.Schedule:
        """Create a schedule (admin): `schedule.spec` is submitted on its cron or interval."""
        made: admin_pb2.Schedule = await self._calls.unary(
            self._admin.CreateSchedule, schedule, retry=False
        )
        return made

    async def schedules(self) -> builtins.list[admin_pb2.Schedule]:
        response = await self._calls.unary(
            self._admin.ListSchedules, admin_pb2.ListSchedulesRequest()
        )
        return list(response.schedules)

    async def schedule_action(self, action: str, name: str) -> admin_pb2.Schedule:
        """`delete`, `pause` or `resume` a schedule."""
        methods = {
            "delete": self._admin.DeleteSchedule,
            "pause": self._admin.PauseSchedule,
            "resume": self._admin.ResumeSchedule,
        }
        if action not in methods:
            raise ValueError(f"unknown schedule action {action!r}")
        done: admin_pb2.Schedule = await self._calls.unary(
            methods[action], admin_pb2.ScheduleRef(name=name), retry=action != "delete"
        )
        return done

    async def watch(
        self,
        *,
        since: int | None = None,
        task_ids: Iterable[str] = (),
        output: bool = False,
        tenant: str = "",
        states: Iterable[int] = (),
        reconnect: bool = True,
    ) -> AsyncGenerator[task_pb2.Event, None]:
        """Events after `since` (None: from now), following live ones; with `states`, only
        tasks' changes into those states (e.g. `FINAL_STATES`: each task's outcome).

        When the connection drops it reconnects with backoff and resumes after the last
        position it reached, so nothing is lost or repeated.
        """
        ids = list(task_ids)
        wanted = list(states)
        cursor = since
        while True:
            request = tasks_pb2.WatchRequest(
                task_ids=ids,
                output=output,
                tenant=tenant,
                states=wanted,  # type: ignore[arg-type]
            )
            if cursor is not None:
                request.since = cursor
            stream, first = await self._calls.open_stream(
                functools.partial(self._tasks.Watch, request), retry=reconnect
            )
            cursor = first.cursor
            try:
                while (response := await stream.read()) is not grpc.aio.EOF:
                    for event in response.events:
                        yield event
                    cursor = response.cursor
                return
            except grpc.aio.AioRpcError as err:
                error = from_rpc_error(err)
                if not reconnect or not isinstance(error, Unavailable):
                    raise error from None
            finally:
                stream.cancel()

    async def run(self, spec: task_pb2.TaskSpec) -> AsyncGenerator[task_pb2.Event, None]:
        """Submit a task and follow it to its end, output included; the last event is final."""
        task = await self.submit(spec)
        async for event in self.watch(since=task.created_seq - 1, task_ids=[task.id], output=True):
            yield event
            if is_final(event.state) and not event.HasField("output"):
                return

    async def call_tool(
        self, name: str, input: Mapping[str, Any] | None = None, /, **common: Any
    ) -> Any:
        """Run the tool `name` on a node that offers it and return what it returned, as plain
        JSON values (whole numbers as int). `common`: the builders' task options. Raises
        TaskFailed if it fails (as it does soon when no connected node offers the tool); while
        it waits, logs why (warning)."""
        task = await self.submit(tool(name, input, **common))
        task = await self.wait_with_reasons(task.id, _log_pending)
        if task.state != task_pb2.TASK_STATE_SUCCEEDED:
            raise TaskFailed(task)
        output = _plain(json_format.MessageToDict(task.result.output))
        # A node carries a value that is not an object as {"result": value}.
        return output["result"] if output.keys() == {"result"} else output


def _log_pending(task: task_pb2.Task) -> None:
    _log.warning("tool %r (task %s) waits: %s", task.spec.tool.name, task.id, task.pending_reason)


_EXACT = 2**53  # beyond, a double no longer holds every whole number


def _plain(value: Any) -> Any:
    """JSON from a Struct with whole numbers as int, as a JSON parser gives them (a Struct
    holds every number as a double)."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= _EXACT:
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
