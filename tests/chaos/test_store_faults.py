"""Chaos: faults of the coordinator's data dir while tasks run (issue 17).

A full disk (a small tmpfs filled, then freed), a second coordinator on the same data dir or
port, and a store that lost its WAL after a kill -9: each mid-run on real processes, then the
nodes' ledgers are checked against what the coordinator recorded (see ledger.py).
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from shoal import AsyncClient, ResourceExhausted, noop
from shoal.specs import is_final
from shoal.v1 import task_pb2
from tests.chaos.cluster import GRACE, Cluster
from tests.chaos.harness import fetch_tasks, observe, wait_nodes
from tests.chaos.ledger import Ledger, Report, check
from tests.chaos.recorder import EventRecorder, replay
from tests.chaos.summary import publish
from tests.chaos.test_chaos import attempt_of, submit_paced
from tests.integration.harness import BIN, STARTUP, Completed, eventually, free_port, run_tool
from tests.integration.test_full_disk import fill

NODES = ["node-a", "node-b"]
SLOTS = 8
WORK = 0.05  # seconds each task takes: 2 nodes x SLOTS finish ~300 a second
BATCH = 50
PACE = 0.1  # seconds between batches
EXIT = 10.0  # seconds a refused coordinator gets to exit (it should at once)


def specs(scenario: str, count: int) -> list[task_pb2.TaskSpec]:
    return [noop({"sleep": WORK, "i": i}, idempotency_key=f"{scenario}-{i}") for i in range(count)]


async def start_nodes(cluster: Cluster, client: AsyncClient) -> None:
    for node_id in NODES:
        await cluster.start_node(node_id, slots=SLOTS)
    await wait_nodes(client, NODES)


async def finished_at_least(recorder: EventRecorder, count: int) -> None:
    def enough() -> None:
        assert len(recorder.finished) >= count, f"{len(recorder.finished)} final"

    await eventually(enough, timeout=STARTUP, interval=0.05)


def executions(ledger: Ledger, ids: Collection[str]) -> int:
    """How many attempts nodes started for the tasks of `ids`."""
    wanted = set(ids)
    return sum(line.task in wanted for line in ledger.select(event="start"))


async def shoal(*args: str | Path) -> Completed | None:
    """`shoal ARGS...` to its end; None when it still ran after EXIT s (it is killed then)."""
    try:
        return await run_tool([str(BIN / "shoal"), *map(str, args)], timeout=EXIT)
    except TimeoutError:
        return None


def one_line(done: Completed | None) -> str:
    """What a refused process said: its one stderr line, else what went otherwise."""
    if done is None:
        return f"still running after {EXIT:g} s"
    lines = done.stderr.splitlines()
    if done.returncode != 1 or len(lines) != 1:
        return f"exit {done.returncode}, stderr {done.stderr!r}"
    return lines[0]


# -- a full disk ---------------------------------------------------------------------------------

DISK = "8m"
DISK_TASKS = 600
NOT_RECORDED = "not recorded yet: the store cannot write: disk full"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """The cluster's data dir on a tmpfs of DISK; ask for it before `cluster`, so that it is
    unmounted once the processes that use it are gone."""
    data = tmp_path / "data"
    data.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(data)], check=True)
    try:
        yield data
    finally:
        subprocess.run(["umount", "-l", str(data)], check=True)


@dataclass
class PoliteSubmitter:
    """Submits in batches; a batch refused as full waits the delay it was given, then again."""

    client: AsyncClient
    ids: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # the refusals' messages

    async def run(self, specs: Sequence[task_pb2.TaskSpec]) -> list[str]:
        for i in range(0, len(specs), BATCH):
            while True:
                try:
                    self.ids += await self.client.submit_batch(specs[i : i + BATCH])
                    break
                except ResourceExhausted as err:
                    self.refused.append(str(err))
                    delay = err.retry_after.total_seconds() if err.retry_after else 1.0
                    await asyncio.sleep(min(delay, 1.0))  # the delay the coordinator named
            await asyncio.sleep(PACE)  # the pace
        return self.ids


async def outcomes_waiting(client: AsyncClient) -> int:
    """Running tasks whose node reported an outcome the store could not write yet."""
    running = await client.list(states=[task_pb2.TASK_STATE_RUNNING], limit=DISK_TASKS)
    return sum(NOT_RECORDED in t.pending_reason for t in running)


def first_finals(recorder: EventRecorder) -> dict[str, tuple[int, tuple[int, int]]]:
    """Per task, the state and attempt of the first final event a watcher was told."""
    out: dict[str, tuple[int, tuple[int, int]]] = {}
    for event in recorder.select(lambda e: e.task_id in recorder.finished):
        if event.task_id not in out and not event.HasField("output") and is_final(event.state):
            out[event.task_id] = (event.state, attempt_of(event))
    return out


@pytest.mark.timeout(120)
async def test_a_full_disk_mid_run_loses_nothing_and_heals(
    small_disk: Path, cluster: Cluster
) -> None:
    assert small_disk == cluster.data_dir
    await cluster.start_coordinator()

    async with cluster.client() as client, EventRecorder(client) as recorder:
        await start_nodes(cluster, client)
        submitter = PoliteSubmitter(client)
        submitting = asyncio.create_task(submitter.run(specs("chaos-disk", DISK_TASKS)))
        await finished_at_least(recorder, DISK_TASKS // 6)
        filler = fill(small_disk)
        full_at = time.monotonic()
        finished_at_fill = len(recorder.finished)

        async def full_shows() -> int:
            """Reads keep working, outcomes wait, and submits are refused again after the
            delay the first refusal named."""
            waiting = await outcomes_waiting(client)
            refused = len(submitter.refused)
            assert refused >= 2 and waiting, f"refused={refused} outcomes_waiting={waiting}"
            return waiting

        waiting = await eventually(full_shows, timeout=30, interval=0.05)
        filler.unlink()  # space again: the coordinator heals by itself
        freed_at = time.monotonic()
        ids = await asyncio.wait_for(submitting, 60)
        await recorder.wait_final(ids, timeout=60)
        healed_at = time.monotonic()
        told = first_finals(recorder)

        # What was told final stays as it was told, and runs no more, after a kill -9.
        await cluster.kill_coordinator()
        await cluster.start_coordinator()
        await wait_nodes(client, NODES)
        seen = await observe("full-disk", cluster, client, recorder, ids)

    after = {i: (t.state, attempt_of(t)) for i, t in seen.tasks.items() if t is not None}
    changed = [i for i, was in told.items() if after.get(i) != was]
    ran = executions(cluster.ledger(), ids)
    report = seen.report
    report.figures.update(
        disk=DISK,
        final_at_fill=str(finished_at_fill),
        refused=str(len(submitter.refused)),
        outcomes_waiting=str(waiting),
        full_s=f"{freed_at - full_at:.1f}",
        healed_s=f"{healed_at - freed_at:.1f}",
        changed_after_restart=str(len(changed)),
        executions=str(ran),
        stored=str(seen.stored),
    )
    publish(report.line())
    assert report.safe, f"{report.problems()}\n{cluster.logs()}"
    assert len(set(ids)) == seen.stored == DISK_TASKS
    assert all("the store cannot write: disk full" in r for r in submitter.refused)
    assert sorted(told) == sorted(ids)
    assert not changed, f"told one outcome, recorded another: {changed[:5]}"
    assert ran == DISK_TASKS, "a task ran again"


# -- a second coordinator ------------------------------------------------------------------------

OWNER_TASKS = 4000  # ~10 s of paced submitting: the three intruders start and end within it


@pytest.mark.timeout(90)
async def test_a_second_coordinator_on_the_data_dir_or_port_exits_mid_run(
    cluster: Cluster,
) -> None:
    await cluster.start_coordinator()
    assert cluster.coordinator is not None
    first = cluster.coordinator
    other_dir = cluster.tmp_path / "other-data"
    intruders = {
        "data-dir": (f"{cluster.host}:{free_port()}", cluster.data_dir),
        "port": (cluster.address, other_dir),
        "both": (cluster.address, cluster.data_dir),
    }

    async with cluster.client() as client, EventRecorder(client) as recorder:
        await start_nodes(cluster, client)
        submitting = asyncio.create_task(submit_paced(client, specs("chaos-owner", OWNER_TASKS)))
        await finished_at_least(recorder, OWNER_TASKS // 10)
        said: dict[str, str] = {}
        exit_s: dict[str, float] = {}
        for name, (listen, data_dir) in intruders.items():
            began = time.monotonic()
            said[name] = one_line(
                await shoal("coordinator", "--listen", listen, "--data-dir", data_dir)
            )
            exit_s[name] = time.monotonic() - began
        running_after = len(recorder.finished) < OWNER_TASKS
        ids = (await asyncio.wait_for(submitting, 60)).ids
        await recorder.wait_final(ids, timeout=60)
        seen = await observe("second-coordinator", cluster, client, recorder, ids)

    epochs = {t.attempt.epoch for t in seen.tasks.values() if t is not None}
    ran = executions(cluster.ledger(), ids)
    report = seen.report
    report.figures.update(
        {f"exit_{name}_s": f"{s:.2f}" for name, s in exit_s.items()},
        epochs=",".join(map(str, sorted(epochs))),
        executions=str(ran),
        stored=str(seen.stored),
    )
    publish(report.line())
    for name, line in said.items():
        publish(f"chaos second-coordinator {name}: {line}")
    assert report.safe, f"{report.problems()}\n{cluster.logs()}"
    assert running_after, "the intruders came after the run: start them sooner"
    assert said["data-dir"].startswith("error: "), said
    assert f"{cluster.data_dir} is in use by pid {first.pid}" in said["data-dir"], said
    held = f"address already in use by pid {first.pid} (shoal)"
    port_held = f"error: cannot listen on {cluster.address}: {held}"
    assert said["port"] == port_held, said
    assert said["both"].startswith("error: ") and f"pid {first.pid}" in said["both"], said
    assert first.running
    assert len(set(ids)) == seen.stored == OWNER_TASKS
    assert len(epochs) == 1, "tasks recorded in two epochs: two coordinators served"
    assert ran == OWNER_TASKS, "a task ran twice"


# -- a store that lost its WAL -------------------------------------------------------------------

DAMAGE_TASKS = 300


async def check_after(
    scenario: str,
    cluster: Cluster,
    client: AsyncClient,
    recorder: EventRecorder,
    acknowledged: Collection[str],
    *,
    forgotten: Collection[str],
) -> Report:
    """`ledger.check` over `acknowledged`, with the ledger lines of `forgotten` tasks (whose
    loss was accepted) left out."""
    tasks, _ = await fetch_tasks(client, acknowledged)
    replayed = await replay(client, through=recorder.durable_seq)
    ledger = cluster.ledger()
    ledger.lines = [line for line in ledger.lines if line.task not in set(forgotten)]
    return check(
        scenario,
        acknowledged=acknowledged,
        tasks=tasks,
        events=[*recorder.events.values(), *replayed],
        ledger=ledger,
    )


@pytest.mark.timeout(120)
async def test_a_store_that_lost_its_wal_is_refused_until_the_loss_is_accepted(
    cluster: Cluster,
) -> None:
    # A coordinator that ran before: what it made then (the admin token that the nodes and
    # the client use) was checkpointed into the database when it stopped.
    first = await cluster.start_coordinator()
    assert await first.stop(GRACE) == 0, cluster.logs()
    await cluster.start_coordinator()
    data_dir, wal = cluster.data_dir, cluster.data_dir / "shoal.db-wal"

    async with cluster.client() as client:
        async with EventRecorder(client) as recorder:
            await start_nodes(cluster, client)
            before = (await submit_paced(client, specs("chaos-damage-a", DAMAGE_TASKS))).ids
            await finished_at_least(recorder, DAMAGE_TASKS // 3)
            await cluster.kill_coordinator()
        told_final = len(recorder.finished)
        old_epochs = {line.epoch for line in cluster.ledger().lines}
        wal_bytes = wal.stat().st_size
        wal.unlink()

        refused = one_line(
            await shoal("coordinator", "--listen", cluster.address, "--data-dir", data_dir)
        )
        checked = await shoal("store", "check", "--data-dir", data_dir)
        accepted = await shoal("store", "accept-loss", "--data-dir", data_dir, "--yes")
        await cluster.start_coordinator()

        # From here on, nothing acknowledged is lost, through one more kill -9.
        async with EventRecorder(client) as recorder:
            await wait_nodes(client, NODES)
            after = (await submit_paced(client, specs("chaos-damage-b", DAMAGE_TASKS))).ids
            await finished_at_least(recorder, DAMAGE_TASKS // 3)
            await cluster.kill_coordinator()
            await cluster.start_coordinator()
            await recorder.wait_final(after, timeout=60)
            report = await check_after(
                "damaged-store", cluster, client, recorder, after, forgotten=before
            )
            kept, _ = await fetch_tasks(client, before)

    new_epochs = {line.epoch for line in cluster.ledger().lines if line.task in set(after)}
    report.figures.update(
        wal_bytes=str(wal_bytes),
        before_acknowledged=str(len(before)),
        before_told_final=str(told_final),
        before_lost=str(sum(t is None for t in kept.values())),
        epochs_before=",".join(map(str, sorted(old_epochs))),
        epochs_after=",".join(map(str, sorted(new_epochs))),
    )
    publish(report.line())
    publish(f"chaos damaged-store refused: {refused}")
    assert report.safe, f"{report.problems()}\n{cluster.logs()}"
    assert refused.startswith("error: refusing to start on the store"), refused
    assert f"shoal store accept-loss --data-dir {data_dir}" in refused, refused
    assert checked is not None and checked.returncode == 1, checked
    assert accepted is not None and accepted.returncode == 0, accepted
    assert min(new_epochs) > max(old_epochs), "an epoch was used twice"
