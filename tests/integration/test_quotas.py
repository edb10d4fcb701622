"""Quotas hold mesh-wide: a rate and a concurrency limit over three real nodes, from ledgers."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from shoal import AsyncClient, noop
from shoal.config import CoordinatorSettings
from shoal.coordinator.server import CoordinatorServer
from shoal.v1 import admin_pb2, task_pb2

from .harness import MeshFactory, eventually

pytestmark = pytest.mark.timeout(90)
WAIT = timedelta(seconds=60)


def ledger_lines(paths: list[Path]) -> list[dict[str, object]]:
    return [json.loads(line) for p in paths for line in p.read_text().splitlines()]


async def three_nodes(mesh_factory: MeshFactory, tmp_path: Path) -> tuple[object, list[Path]]:
    ledgers = [tmp_path / f"node-{i}.jsonl" for i in range(3)]
    mesh = await mesh_factory(slots=8, node_id="node-0", ledger=ledgers[0])
    for i in (1, 2):
        await mesh.start_node(node_id=f"node-{i}", slots=8, ledger=ledgers[i])
    return mesh, ledgers


async def test_a_rate_limit_holds_across_three_nodes(
    mesh_factory: MeshFactory, tmp_path: Path
) -> None:
    mesh, ledgers = await three_nodes(mesh_factory, tmp_path)
    client = mesh.client  # type: ignore[attr-defined]
    await client.set_quota(admin_pb2.Quota(key="api", rate=10, burst=10))
    specs = [noop({"i": i}) for i in range(100)]
    for spec in specs:
        spec.quota_keys.append("api")
        spec.routing = task_pb2.ROUTING_STRATEGY_RANDOM  # spread them, though one node would do
    ids = await client.submit_batch(specs)
    tasks = [await client.wait(i, timeout=WAIT) for i in ids]
    assert {t.state for t in tasks} == {task_pb2.TASK_STATE_SUCCEEDED}

    starts = sorted(float(x["t"]) for x in ledger_lines(ledgers) if x["event"] == "start")  # type: ignore[arg-type]
    assert len(starts) == 100
    span = starts[-1] - starts[0]
    # The bucket starts empty and refills at 10/s: 100 tasks need 10 s, less the first slot.
    assert span >= 9.5, span
    worst = max(sum(1 for t in starts if s <= t < s + 1.0) for s in starts)
    # What the bucket allows in any second: what it holds at its start (at most the burst,
    # 10) and what it refills in it (10).
    assert worst <= 10 + 10, worst
    print(f"\nrate 10/s over 3 nodes: 100 tasks in {span:.2f} s, busiest second {worst}")
    assert len({x["node"] for x in ledger_lines(ledgers)}) == 3


async def test_a_concurrency_limit_holds_across_three_nodes(
    mesh_factory: MeshFactory, tmp_path: Path
) -> None:
    mesh, ledgers = await three_nodes(mesh_factory, tmp_path)
    client = mesh.client  # type: ignore[attr-defined]
    await client.set_quota(admin_pb2.Quota(key="db", concurrency=2))
    specs = [noop({"sleep": 0.05, "i": i}) for i in range(30)]
    for spec in specs:
        spec.quota_keys.append("db")
        spec.routing = task_pb2.ROUTING_STRATEGY_RANDOM
    ids = await client.submit_batch(specs)
    for i in ids:
        assert (await client.wait(i, timeout=WAIT)).state == task_pb2.TASK_STATE_SUCCEEDED

    edges = sorted(
        (float(x["t"]), 1 if x["event"] == "start" else -1)  # type: ignore[arg-type]
        for x in ledger_lines(ledgers)
        if x["event"] in ("start", "finish")
    )
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    assert peak == 2, peak
    print(f"\nconcurrency 2 over 3 nodes: at most {peak} of 30 tasks overlapped")
    assert len({x["node"] for x in ledger_lines(ledgers)}) == 3
    usage = await client.usage("db")
    assert [u.requests for u in usage] == [30, 30]  # the day and the month


async def test_a_daily_budget_stops_dispatch_and_its_spending_survives_a_restart(
    mesh_factory: MeshFactory, tmp_path: Path
) -> None:
    # $1 a day. Each task reserves its estimate, $0.20, and reports using $0.25 (125k prompt
    # and 62.5k completion tokens at $1 and $2 per million): five fit the budget by their
    # estimates, they overspend it by what their estimates missed, and the sixth waits.
    pricing = {"small": (1.0, 2.0)}
    mesh = await mesh_factory(slots=8, coordinator={"pricing": pricing})
    client = mesh.client
    await client.set_quota(admin_pb2.Quota(key="llm:small", cost_per_day=1.0))
    used = {"prompt_tokens": 125_000, "completion_tokens": 62_500, "model": "small"}
    specs = []
    for i in range(6):
        spec = noop({"i": i, "sleep": 0.2, "usage": used}, quota_keys=["llm:small"])
        spec.estimate.cost = 0.20
        specs.append(spec)
    ids = await client.submit_batch(specs)

    async def settled() -> list[task_pb2.Task]:
        tasks = [await client.get(i) for i in ids]
        states = sorted(task_pb2.TaskState.Name(t.state) for t in tasks)
        assert states == ["TASK_STATE_PENDING"] + ["TASK_STATE_SUCCEEDED"] * 5, states
        return tasks

    tasks = await eventually(settled, timeout=20.0)
    (waiting,) = [t for t in tasks if t.state == task_pb2.TASK_STATE_PENDING]
    assert "budget of $1 a day spent (or reserved) by llm:small" in waiting.pending_reason
    day, month = await client.usage("llm:small")
    assert (day.requests, round(day.cost, 6), round(month.cost, 6)) == (5, 1.25, 1.25)
    assert day.cost - 1.0 <= 5 * 0.20  # overspend: at most the reservations in flight
    print(f"\n$1/day budget: 5 ran, ${day.cost:.2f} spent; the 6th: {waiting.pending_reason}")

    await mesh.coordinator.stop()
    restarted = CoordinatorServer(
        CoordinatorSettings(listen=mesh.address, data_dir=mesh.data_dir, pricing=pricing)
    )
    await restarted.start()
    try:
        async with AsyncClient(mesh.address, token=mesh.token) as again:
            day, _ = await again.usage("llm:small")
            assert round(day.cost, 6) == 1.25  # the spending survived the restart
            assert (await again.get(waiting.id)).state == task_pb2.TASK_STATE_PENDING
    finally:
        await restarted.stop()
