"""What chaos scenarios ask the coordinator: waits on its answers, and the final check.

`observe` puts the coordinator's tasks and events together with the nodes' ledgers into a
`Report` (see ledger.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from shoal import AsyncClient, NotFound, ShoalError, Unavailable
from shoal.errors import InternalError
from shoal.v1 import admin_pb2, task_pb2
from tests.chaos.cluster import Cluster
from tests.chaos.ledger import Report, check
from tests.chaos.recorder import EventRecorder, replay
from tests.integration.harness import STARTUP, eventually

__all__ = [
    "LastSeen",
    "Observation",
    "fetch_tasks",
    "node_status",
    "observe",
    "seconds",
    "until_acknowledged",
    "wait_nodes",
    "wait_state",
]

_T = TypeVar("_T")


def seconds(ts: Timestamp) -> float:
    """A protobuf Timestamp as time.time() seconds."""
    return ts.seconds + ts.nanos / 1e9


async def wait_nodes(
    client: AsyncClient, node_ids: Collection[str], *, timeout: float = STARTUP
) -> list[admin_pb2.NodeStatus]:
    """Return once every one of `node_ids` holds a session (others may too)."""

    async def joined() -> list[admin_pb2.NodeStatus]:
        nodes = await client.nodes()
        missing = set(node_ids) - {n.info.node_id for n in nodes}
        assert not missing, f"not connected: {sorted(missing)}"
        return nodes

    return await eventually(
        joined, timeout=timeout, interval=0.05, retry_on=(AssertionError, Unavailable)
    )


async def until_acknowledged(
    call: Callable[[], Awaitable[_T]], *, timeout: float = 60.0
) -> tuple[_T, int]:
    """`call()` until the coordinator answers; returns the answer and how many tries failed.

    Retried with backoff on Unavailable, and on InternalError, which a call cut by a dying
    server can end with; any other error is a real answer and raises.
    """
    deadline = time.monotonic() + timeout
    backoff = 0.05
    failed = 0
    while True:
        try:
            return await call(), failed
        except (Unavailable, InternalError) as err:
            failed += 1
            if time.monotonic() > deadline:
                raise AssertionError(f"not acknowledged within {timeout:g} s") from err
        await asyncio.sleep(backoff)  # a backoff between tries, not a wait on a condition
        backoff = min(1.0, backoff * 2)


class LastSeen:
    """When the coordinator last heard from a node (its wall clock), polled while entered."""

    def __init__(self, client: AsyncClient, node_id: str, *, interval: float = 0.1) -> None:
        self._client = client
        self.node_id = node_id
        self.interval = interval
        self.value = 0.0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LastSeen:
        self._task = asyncio.create_task(self._poll(), name=f"chaos-last-seen-{self.node_id}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _poll(self) -> None:
        while True:
            with contextlib.suppress(ShoalError):
                status = await node_status(self._client, self.node_id)
                if status is not None:
                    self.value = max(self.value, seconds(status.last_seen))
            await asyncio.sleep(self.interval)


async def node_status(client: AsyncClient, node_id: str) -> admin_pb2.NodeStatus | None:
    for node in await client.nodes():
        if node.info.node_id == node_id:
            return node
    return None


async def wait_state(
    client: AsyncClient, task_id: str, states: Collection[int], *, timeout: float = STARTUP
) -> task_pb2.Task:
    """The task once it is in one of `states`."""

    async def reached() -> task_pb2.Task:
        task = await client.get(task_id)
        assert task.state in states, task_pb2.TaskState.Name(task.state)
        return task

    return await eventually(reached, timeout=timeout, interval=0.05)


async def fetch_tasks(
    client: AsyncClient, ids: Collection[str]
) -> tuple[dict[str, task_pb2.Task | None], int]:
    """The coordinator's Task for each id (None: unknown), and how many tasks it holds in all."""
    listed = {t.id: t for t in await client.list(limit=len(ids) + 10_000)}
    out: dict[str, task_pb2.Task | None] = {}
    for task_id in ids:
        if task_id in listed:
            out[task_id] = listed[task_id]
            continue
        try:
            out[task_id] = await client.get(task_id)
        except NotFound:
            out[task_id] = None
    return out, len(listed)


@dataclass
class Observation:
    """A scenario's outcome: the report, the coordinator's tasks, how many tasks it holds."""

    report: Report
    tasks: dict[str, task_pb2.Task | None]
    stored: int  # all the tasks the coordinator holds: more than acknowledged = phantoms


async def observe(
    scenario: str,
    cluster: Cluster,
    client: AsyncClient,
    recorder: EventRecorder,
    acknowledged: Collection[str],
) -> Observation:
    """Check what happened (see `ledger.check`) from the coordinator's answers now, its
    events (recorded live and replayed from sequence 0) and the nodes' ledgers."""
    tasks, stored = await fetch_tasks(client, acknowledged)
    replayed = await replay(client, through=recorder.durable_seq)
    report = check(
        scenario,
        acknowledged=acknowledged,
        tasks=tasks,
        events=[*recorder.events.values(), *replayed],
        ledger=cluster.ledger(),
    )
    return Observation(report, tasks, stored)
