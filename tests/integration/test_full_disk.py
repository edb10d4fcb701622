"""A coordinator process whose data dir fills up (a small tmpfs), then has space again."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import subprocess
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from shoal import AsyncClient, ResourceExhausted, Unavailable, WaitTimeout, shell
from shoal.specs import FINAL_STATES
from shoal.v1 import task_pb2

from .harness import STARTUP, CliProcesses, eventually, free_port, gate_script

pytestmark = pytest.mark.timeout(90)

TASKS = 12  # each with one dependent
WAIT = timedelta(seconds=30)
_SUCCEEDED = task_pb2.TASK_STATE_SUCCEEDED


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """tmp_path/"data" on a 2 MiB tmpfs of its own (unmounted in teardown)."""
    data = tmp_path / "data"
    data.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(data)], check=True)
    try:
        yield data
    finally:
        subprocess.run(["umount", "-l", str(data)], check=True)


def fill(directory: Path) -> Path:
    """Write a file in `directory` until its filesystem has no byte left; returns the file."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as f:
        for chunk in (1 << 16, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * chunk)
    with pytest.raises(OSError) as full, (directory / "probe").open("wb", buffering=0) as f:
        f.write(b"\0" * 4096)
    assert full.value.errno == errno.ENOSPC
    return filler


def runs(path: Path) -> Counter[str]:
    return Counter(path.read_text().split()) if path.exists() else Counter()


async def test_a_full_data_dir_shows_nothing_final_unrecorded_and_heals_when_space_returns(
    small_disk: Path, cli: CliProcesses, tmp_path: Path
) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    await cli.coordinator(port, small_disk)
    await cli.node(address, node_id="n1", slots=2 * TASKS)
    gate, ran = tmp_path / "gate", tmp_path / "runs"
    # Each first task waits for the gate; each appends its name to `ran` when it runs.
    specs = [shell(gate_script(gate, f"echo a{i} >> {ran}; echo a{i}")) for i in range(TASKS)]
    specs += [shell(f"echo b{i} >> {ran}; echo b{i}", depends_on=[i]) for i in range(TASKS)]

    async with AsyncClient(address) as client:
        ids = await client.submit_batch(specs)
        firsts = ids[:TASKS]

        async def running() -> None:
            states = {(await client.get(i)).state for i in firsts}
            assert states == {task_pb2.TASK_STATE_RUNNING}

        await eventually(running, timeout=STARTUP)
        filler = fill(small_disk)

        # Submits are refused precisely, with a delay to retry after (not UNAVAILABLE).
        with pytest.raises(ResourceExhausted, match="the store cannot write: disk full") as full:
            await client.submit_batch([shell("true")])
        assert full.value.retry_after is not None

        gate.touch()  # the tasks finish; their outcomes cannot be committed

        async def reported() -> list[task_pb2.Task]:
            tasks = [await client.get(i) for i in firsts]
            for t in tasks:
                assert "not recorded yet: the store cannot write: disk full" in t.pending_reason
            return tasks

        for task in await eventually(reported, timeout=WAIT.total_seconds()):
            assert task.state == task_pb2.TASK_STATE_RUNNING and not task.HasField("result")
        assert runs(ran) == Counter(f"a{i}" for i in range(TASKS))
        with pytest.raises(WaitTimeout) as waited:
            await client.wait(firsts[0], timeout=timedelta(milliseconds=200))
        assert waited.value.task.state == task_pb2.TASK_STATE_RUNNING
        assert await client.list(states=list(FINAL_STATES)) == []
        for dependent in ids[TASKS:]:
            assert (await client.get(dependent)).state == task_pb2.TASK_STATE_PENDING

        filler.unlink()  # space again: the coordinator heals by itself
        told = await asyncio.gather(*(client.wait(i, timeout=WAIT) for i in ids))
        assert {t.state for t in told} == {_SUCCEEDED}, told
        assert [t.result.stdout for t in told] == [f"{c}{i}\n" for c in "ab" for i in range(TASKS)]

    await cli.started[0].stop()  # a restart: what was told final stays as it was told
    await cli.coordinator(port, small_disk)
    async with AsyncClient(address) as client:

        async def reconnected() -> None:
            assert [n.info.node_id for n in await client.nodes()] == ["n1"]

        await eventually(reconnected, timeout=STARTUP, retry_on=(AssertionError, Unavailable))
        after = [await client.get(i) for i in ids]
        assert [(t.state, t.attempt, t.result) for t in after] == [
            (t.state, t.attempt, t.result) for t in told
        ]
        outcomes: list[task_pb2.Event] = []
        async with contextlib.aclosing(client.watch(since=0, states=FINAL_STATES)) as events:
            async for event in events:
                outcomes.append(event)
                if len({e.task_id for e in outcomes}) == len(ids):
                    break
        assert sorted(e.task_id for e in outcomes) == sorted(ids)  # one outcome each
    assert runs(ran) == Counter(f"{c}{i}" for c in "ab" for i in range(TASKS))
