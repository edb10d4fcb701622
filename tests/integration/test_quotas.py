"""Quotas hold mesh-wide: a rate and a concurrency limit over three real nodes, from ledgers."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from shoal import noop
from shoal.v1 import admin_pb2, task_pb2

from .harness import MeshFactory

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
