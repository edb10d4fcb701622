"""Locks hold mesh-wide: writers to one file never interleave, readers overlap, leases fence."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from urllib.request import urlopen

import pytest

from shoal import FailedPrecondition, python, shell
from shoal.v1 import task_pb2

from .harness import MeshFactory, eventually, gate_script

pytestmark = pytest.mark.timeout(120)
WAIT = timedelta(seconds=90)

WRITER = 'for n in $(seq 0 999); do echo "{i} $n"; done >> "$TARGET"'
"""Appends 1,000 lines, one write each: without the lock, concurrent writers interleave."""


async def test_writers_under_one_lock_never_interleave_and_readers_overlap(
    mesh_factory: MeshFactory, tmp_path: Path
) -> None:
    mesh = await mesh_factory(slots=6, node_id="node-0")
    for i in (1, 2):
        await mesh.start_node(node_id=f"node-{i}", slots=6)
    target = tmp_path / "shared.log"
    lock = f"file:{target}"
    writers = [
        shell(WRITER.format(i=i), env={"TARGET": str(target)}, locks=[lock], name=f"writer-{i}")
        for i in range(50)
    ]
    for spec in writers:
        spec.routing = task_pb2.ROUTING_STRATEGY_RANDOM
    ids = await mesh.client.submit_batch(writers)
    tasks = [await mesh.client.wait(i, timeout=WAIT) for i in ids]
    assert {t.state for t in tasks} == {task_pb2.TASK_STATE_SUCCEEDED}, tasks[0]
    assert len({t.node_id for t in tasks}) == 3

    lines = target.read_text().splitlines()
    assert len(lines) == 50 * 1000
    blocks = [lines[i : i + 1000] for i in range(0, len(lines), 1000)]
    for block in blocks:  # each writer's 1,000 lines are one run, in order
        writer = block[0].split()[0]
        assert block == [f"{writer} {n}" for n in range(1000)], block[:3]
    print(f"\n50 writers on 3 nodes under {lock}: {len(lines)} lines, no interleaving")

    # Readers share the lock: all four hold it at once (none ends before the gate opens).
    marks, gate = tmp_path / "readers", tmp_path / "gate"
    marks.mkdir()
    reader = gate_script(gate, f"ls {marks} | wc -l", limit=30)
    readers = [shell(f"touch {marks}/$$; {reader}", locks=[f"read:{lock}"]) for _ in range(4)]
    ids = await mesh.client.submit_batch(readers)

    async def all_holding() -> None:
        assert len(list(marks.iterdir())) == 4
        states = {(await mesh.client.get(i)).state for i in ids}
        assert states == {task_pb2.TASK_STATE_RUNNING}, states

    await eventually(all_holding, timeout=20.0)
    gate.touch()
    seen = [await mesh.client.wait(i, timeout=WAIT) for i in ids]
    assert [t.result.stdout.strip() for t in seen] == ["4"] * 4, seen


async def test_a_lease_holds_tasks_back_and_its_token_fences(
    mesh_factory: MeshFactory, tmp_path: Path
) -> None:
    mesh = await mesh_factory(slots=2)
    client = mesh.client
    first = await client.acquire_lock("db:main", ttl=timedelta(seconds=30))
    with pytest.raises(FailedPrecondition, match="lock db:main is held by lease"):
        await client.acquire_lock("db:main", ttl=timedelta(seconds=5), wait=timedelta(seconds=0.2))
    task = await client.submit(python("print('migrated')", locks=["db:main"]))
    waiting = await client.get(task.id)
    assert waiting.state == task_pb2.TASK_STATE_PENDING
    assert waiting.pending_reason == (
        f"lock db:main is held by lease db:main#{first.token} (exclusive)"
    )

    # One waiting for the lease gets it once the holder lets go (and the task after it).
    waiter = asyncio.create_task(
        client.acquire_lock("db:main", ttl=timedelta(seconds=5), wait=timedelta(seconds=20))
    )
    await asyncio.sleep(0.2)
    assert not waiter.done()
    await client.release_lock(first)
    middle = await waiter
    assert middle.token == first.token + 1
    await client.release_lock(middle)
    assert (await client.wait(task.id, timeout=WAIT)).result.stdout == "migrated\n"
    second = await client.acquire_lock("db:main", ttl=timedelta(seconds=1))
    assert second.token > middle.token  # fencing: every lease of the name gets a larger one
    with pytest.raises(FailedPrecondition, match="has ended"):
        await client.release_lock(first)
    await client.release_lock(second)


async def test_lock_contention_shows_in_metrics(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(slots=2, coordinator={"metrics_listen": "127.0.0.1:0"})
    lease = await mesh.client.acquire_lock("db:main", ttl=timedelta(seconds=30))
    ids = await mesh.client.submit_batch([python("print(1)", locks=["db:main"]) for _ in range(3)])
    url = f"http://{mesh.coordinator.metrics_address}/metrics"

    async def scrape() -> str:
        return await asyncio.to_thread(lambda: urlopen(url, timeout=5).read().decode())

    async def contended() -> None:
        text = await scrape()
        assert 'shoal_waiting_tasks{gate="lock",key="db:main"} 3.0' in text, text

    await eventually(contended)
    await mesh.client.release_lock(lease)
    for task_id in ids:
        await mesh.client.wait(task_id, timeout=WAIT)
    text = await scrape()
    assert 'shoal_tasks_finished_total{state="succeeded"} 3.0' in text
    assert 'shoal_waiting_tasks{gate="lock"' not in text
