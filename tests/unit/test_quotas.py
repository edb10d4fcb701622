"""Quotas through the core, on an injected clock: rate, concurrency, budgets, fail-fast."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from shoal import shell
from shoal._status import from_rpc_error, to_status
from shoal.config import CoreOptions
from shoal.coordinator.engine import Coordinator
from shoal.coordinator.sessions import NodeSession
from shoal.coordinator.store import SqliteStore
from shoal.errors import FieldViolation, ResourceExhausted
from shoal.v1 import admin_pb2, node_pb2, task_pb2

from .test_core import ADMIN, ALICE, NODE, Wall, assignments, hello

PRICING = {"small": (1.0, 2.0)}  # $ per million prompt / completion tokens


def with_usage(a: node_pb2.Assignment, prompt: int, completion: int) -> node_pb2.NodeMessage:
    result = task_pb2.TaskResult(
        usage=task_pb2.Usage(prompt_tokens=prompt, completion_tokens=completion, model="small")
    )
    update = node_pb2.TaskUpdate(
        task_id=a.task_id,
        attempt=a.attempt,
        finished=node_pb2.Finished(state=task_pb2.TASK_STATE_SUCCEEDED, result=result),
    )
    return node_pb2.NodeMessage(updates=node_pb2.UpdateBatch(updates=[update]))


def keyed(key: str, **kw: object) -> task_pb2.TaskSpec:
    spec = shell("true", **kw)  # type: ignore[arg-type]
    spec.quota_keys.append(key)
    return spec


async def dispatched(session: NodeSession) -> list[node_pb2.Assignment]:
    """What dispatch sent since the last call (woken tasks go one loop turn after another)."""
    for _ in range(10):
        await asyncio.sleep(0)
    if not session._assignments:  # nothing was assigned: outgoing() would wait
        return []
    return await assignments(session)


@pytest.fixture
def wall() -> Wall:
    return Wall()


async def open_core(path: Path, wall: Wall) -> Coordinator:
    c = Coordinator(
        SqliteStore(path), CoreOptions(pricing=PRICING), clock=wall, wall=wall, rng=random.Random(3)
    )
    await c.start()
    return c


@pytest.fixture
async def core(tmp_path: Path, wall: Wall) -> AsyncIterator[Coordinator]:
    c = await open_core(tmp_path / "s.db", wall)
    yield c
    await c.stop()


async def test_a_rate_limit_spaces_dispatches_and_says_when(core: Coordinator, wall: Wall) -> None:
    await core.set_quota(admin_pb2.Quota(key="api", rate=2, burst=2))
    done = await core.submit([keyed("api") for _ in range(5)], by=ALICE)
    node = core.attach(hello("n1", slots=10), "peer", by=NODE)
    assert await dispatched(node) == []  # a new limit starts with an empty bucket
    waiting = await core.get(done[0].task_id, by=ALICE)
    assert waiting.pending_reason == "rate limit api: next slot in 0.5 s"
    wall.now += 1.0  # two tokens
    core.tick()
    assert len(await dispatched(node)) == 2
    wall.now += 0.5
    core.tick()
    assert len(await dispatched(node)) == 1
    events = [c.event() for c in core.events.after(core.events.oldest_seq - 1) or [] if c]
    limited = [e.quota for e in events if e.HasField("quota")]
    assert limited[0].key == "api" and limited[0].limited


async def test_concurrency_and_fail_fast(core: Coordinator) -> None:
    await core.set_quota(admin_pb2.Quota(key="gpu", concurrency=2))
    await core.set_quota(admin_pb2.Quota(key="strict", concurrency=1, fail_fast=True))
    done = await core.submit([keyed("gpu") for _ in range(3)], by=ALICE)
    node = core.attach(hello("n1", slots=10), "peer", by=NODE)
    first = await dispatched(node)
    assert len(first) == 2
    third = await core.get(done[2].task_id, by=ALICE)
    assert third.pending_reason == "concurrency limit (2 running) of gpu"
    core.on_message(node, with_usage(first[0], 0, 0))
    (woken,) = await dispatched(node)
    assert woken.task_id == done[2].task_id

    strict = await core.submit([keyed("strict"), keyed("strict")], by=ALICE)
    await dispatched(node)
    failed = await core.wait(strict[1].task_id, None, by=ALICE)
    assert failed.state == task_pb2.TASK_STATE_FAILED
    assert failed.result.error.startswith("RESOURCE_EXHAUSTED: concurrency limit")


async def test_a_budget_counts_reported_usage_and_survives_a_restart(
    tmp_path: Path, wall: Wall
) -> None:
    path = tmp_path / "s.db"
    c = await open_core(path, wall)
    # $1 a day; each task reserves its estimate (250k prompt + 250k completion = $0.75).
    await c.set_quota(admin_pb2.Quota(key="llm", cost_per_day=1.0))
    spec = keyed("llm")
    spec.estimate.CopyFrom(task_pb2.Usage(prompt_tokens=250_000, completion_tokens=250_000))
    spec.estimate.model = "small"
    done = await c.submit([spec, spec.__deepcopy__()], by=ALICE)
    node = c.attach(hello("n1", slots=10), "peer", by=NODE)
    (a,) = await dispatched(node)  # the second would overspend the reservation
    assert (
        "budget of $1 a day spent (or reserved) by llm"
        in (await c.get(done[1].task_id, by=ALICE)).pending_reason
    )
    c.on_message(node, with_usage(a, 100_000, 50_000))  # it used $0.20
    (b,) = await dispatched(node)  # 0.20 + 0.75 fits
    c.on_message(node, with_usage(b, 100_000, 50_000))
    await c.wait(b.task_id, None, by=ALICE)
    (day,) = [u for u in c.quotas.usage("llm") if len(u.period) == 10]
    assert (day.requests, day.tokens, round(day.cost, 6)) == (2, 300_000, 0.4)
    await c.stop()

    c = await open_core(path, wall)
    try:
        (day,) = [u for u in c.quotas.usage("llm") if len(u.period) == 10]
        assert round(day.cost, 6) == 0.4  # spent money is not forgotten by a restart
        assert [q.key for q in c.quotas.quotas()] == ["llm"]
        await c.submit([spec], by=ADMIN)
        node = c.attach(hello("n1", slots=10), "peer", by=NODE)
        assert await dispatched(node) == []  # 0.40 + 0.75 > 1
        wall.now += 86_400  # the next UTC day
        c.tick()
        assert len(await dispatched(node)) == 1
    finally:
        await c.stop()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_a_tenant_submitting_too_fast_is_told_which_quota_and_when(tmp_path: Path) -> None:
    clock = Clock()
    options = CoreOptions(tenant_submit_rate=2, tenant_submit_burst=2)
    c = Coordinator(SqliteStore(tmp_path / "s.db"), options, clock=clock)
    await c.start()
    try:
        await c.submit([shell("true", tenant="acme")] * 2, by=ADMIN)
        with pytest.raises(ResourceExhausted) as refused:
            await c.submit([shell("true", tenant="acme")], by=ADMIN)
        assert refused.value.retry_after == timedelta(seconds=0.5)
        assert [(q.field, q.description) for q in refused.value.quota] == [
            ("tenant:acme", "tasks submitted per second")
        ]
        await c.submit([shell("true", tenant="other")], by=ADMIN)  # per tenant
        clock.now += 0.5
        await c.submit([shell("true", tenant="acme")], by=ADMIN)
    finally:
        await c.stop()


def test_quota_failures_travel_as_google_rpc_details() -> None:
    err = ResourceExhausted(
        "slow down",
        retry_after=timedelta(seconds=2),
        quota=[FieldViolation("tenant:acme", "tasks submitted per second")],
    )
    status = to_status(err)

    class Call:
        def code(self) -> grpc.StatusCode:
            return status.code

        def details(self) -> str:
            return str(status.details)

        def trailing_metadata(self) -> object:
            return status.trailing_metadata

    back = from_rpc_error(Call())
    assert isinstance(back, ResourceExhausted)
    assert back.retry_after == timedelta(seconds=2)
    assert [(q.field, q.description) for q in back.quota] == [
        ("tenant:acme", "tasks submitted per second")
    ]


async def test_reported_usage_counts_by_tenant_without_a_quota(
    core: Coordinator,
) -> None:
    spec = shell("llm", tenant="acme")
    (done,) = await core.submit([spec], by=ADMIN)
    node = core.attach(hello("n1"), "peer", by=NODE)
    (a,) = await dispatched(node)
    core.on_message(node, with_usage(a, 1_000_000, 500_000))  # $1 + $1
    await core.wait(done.task_id, None, by=ADMIN)
    for key in ("tenant:acme", "executor:shell"):
        day, month = core.quotas.usage(key)
        assert (day.requests, day.tokens, day.cost) == (1, 1_500_000, 2.0), key
        assert month.cost == 2.0


def finished(assigned: list[node_pb2.Assignment]) -> node_pb2.NodeMessage:
    """Each assignment, finished successfully, reporting no usage (a plain shell task)."""
    updates = [
        node_pb2.TaskUpdate(
            task_id=a.task_id,
            attempt=a.attempt,
            finished=node_pb2.Finished(state=task_pb2.TASK_STATE_SUCCEEDED),
        )
        for a in assigned
    ]
    return node_pb2.NodeMessage(updates=node_pb2.UpdateBatch(updates=updates))


async def test_every_run_counts_for_each_of_its_keys_and_survives_a_restart(
    tmp_path: Path, wall: Wall
) -> None:
    path = tmp_path / "s.db"
    c = await open_core(path, wall)
    await c.set_quota(admin_pb2.Quota(key="team:ml"))  # an empty quota: it just counts
    specs = [shell("true", tenant="acme") for _ in range(5)]
    specs += [keyed("team:ml", tenant="acme"), keyed("own-key")]
    done = await c.submit(specs, by=ADMIN)
    node = c.attach(hello("n1", slots=10), "peer", by=NODE)
    assigned = await dispatched(node)
    assert len(assigned) == 7
    c.on_message(node, finished(assigned))
    for d in done:
        await c.wait(d.task_id, None, by=ADMIN)
    # Its own keys count with a quota (an empty one just counts), the automatic ones always.
    expected = {"executor:shell": 7, "tenant:acme": 6, "team:ml": 1}

    def requests(core: Coordinator) -> dict[str, tuple[int, int]]:
        counted: dict[str, list[int]] = {}
        for u in core.quotas.usage():
            counted.setdefault(u.key, []).append(u.requests)  # the day's, then the month's
        return {k: (day, month) for k, (day, month) in counted.items()}

    assert requests(c) == {k: (n, n) for k, n in expected.items()}
    await c.stop()

    c = await open_core(path, wall)
    try:
        assert requests(c) == {k: (n, n) for k, n in expected.items()}
    finally:
        await c.stop()
