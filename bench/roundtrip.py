"""Sequential round trips: one no-op task at a time, submitted and then waited for.

What is measured: --trips times (default 500, after --warmup), this client sends `Submit`
with one no-op task through the SDK, then `Wait` for it, then the next. One coordinator
(durable store, synchronous=FULL) and one node run as `shoal` CLI processes on loopback.
Figures: p50/p99 of the round trip (submit sent to Wait answered) against issue 24's targets,
the CPU time per trip of each process, and a breakdown hop by hop, from times the path
already records (all processes share the machine's wall clock):

    submit sent         this client, before the call
    Submit committed    the QUEUED event's time (published after the commit)
    dispatched          the ASSIGNED event's time
    started received    the RUNNING event's time: the node received it and said it started
    finish received     the task's finished_at: the node's result reached the coordinator
    outcome committed   the final event's time (published after the commit)
    Wait answered       this client, when the call returned

The events are read back after the trips (`Watch` from the first one's sequence number),
so no watcher adds its work to the trips measured.

Two floors, measured in the same run, tell how far below the figures a trip can go on this
machine: a one-row SQLite commit with synchronous=FULL on the store's disk (a trip makes two,
the acceptance and the outcome), and a bare gRPC call from this client to the coordinator
(`grpc.health.v1.Health/Check`, which touches no store; a trip makes two calls and sends two
stream messages).

    .venv/bin/python bench/roundtrip.py                # writes bench/results/roundtrip.json
    .venv/bin/python bench/roundtrip.py --trips 200
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from _common import (
    RESULTS,
    BenchError,
    Children,
    Cluster,
    CpuMeter,
    Deadline,
    admin_token,
    default_shoal,
    figure,
    finish,
    meta,
    ms,
    percentile,
    run_async,
    start_cluster,
    wait_nodes,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shoal import AsyncClient, noop
from shoal.errors import ShoalError
from shoal.specs import is_final
from shoal.v1 import task_pb2

# The points along the path, in order; a hop is the time between two that follow each other.
POINTS = (
    "submit sent",
    "Submit committed",
    "dispatched",
    "started received",
    "finish received",
    "outcome committed",
    "Wait answered",
)
_EVENT_POINTS = {
    task_pb2.TASK_STATE_QUEUED: "Submit committed",
    task_pb2.TASK_STATE_ASSIGNED: "dispatched",
    task_pb2.TASK_STATE_RUNNING: "started received",
}


class Trace:
    """The times (ns, wall clock) seen for each task along its path."""

    def __init__(self) -> None:
        self.points: dict[str, dict[str, int]] = {}

    def note(self, task_id: str, point: str, t_ns: int) -> None:
        self.points.setdefault(task_id, {}).setdefault(point, t_ns)


async def replay(client: AsyncClient, trace: Trace, since: int, last: str) -> None:
    """Note the times of the events after `since` up to `last`'s final one. Read after the
    round trips, from the coordinator's in-memory log: a live watcher would add its own work
    (a send per event) to every trip it measures."""
    async for event in client.watch(since=since, output=False):
        if not event.task_id:
            continue
        t = event.time.ToNanoseconds()
        if is_final(event.state):
            trace.note(event.task_id, "outcome committed", t)
            if event.task_id == last:
                return
        elif (point := _EVENT_POINTS.get(event.state)) is not None:
            trace.note(event.task_id, point, t)


async def trip(client: AsyncClient, trace: Trace) -> task_pb2.Task:
    """One round trip; returns the task as Wait answered."""
    sent = time.time_ns()
    task = await client.submit(noop())
    done = await client.wait(task.id)
    answered = time.time_ns()
    if done.state != task_pb2.TASK_STATE_SUCCEEDED:
        raise BenchError(f"task {task.id} ended {task_pb2.TaskState.Name(done.state)}")
    trace.note(task.id, "submit sent", sent)
    trace.note(task.id, "Wait answered", answered)
    if done.HasField("finished_at"):
        trace.note(task.id, "finish received", done.finished_at.ToNanoseconds())
    return done


def commit_floor(path: Path, n: int) -> tuple[str, list[float]]:
    """Times of `n` one-row commits, WAL with synchronous=FULL, as the store commits."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (v BLOB)")
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t VALUES (?)", (b"x" * 200,))
            db.execute("COMMIT")
            times.append(time.perf_counter() - t0)
        return "SQLite commit, synchronous=FULL", times
    finally:
        db.close()


async def call_floor(address: str, n: int) -> tuple[str, list[float]]:
    """Times of `n` gRPC calls to the coordinator that do nothing (Health/Check)."""
    async with grpc.aio.insecure_channel(address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        request = health_pb2.HealthCheckRequest()
        await check(request)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            await check(request)
            times.append(time.perf_counter() - t0)
        return "gRPC call, Health/Check", times


def breakdown(trace: Trace, ids: Sequence[str]) -> list[dict[str, Any]]:
    """p50/p99 of each hop (ms) over the tasks that have both its ends; a point a task lacks
    (e.g. RUNNING, when started and finished came in one batch) joins its hop to the next."""
    hops: dict[tuple[str, str], list[float]] = {}
    for task_id in ids:
        points = trace.points.get(task_id, {})
        seen = [p for p in POINTS if p in points]
        for a, b in itertools.pairwise(seen):
            hops.setdefault((a, b), []).append((points[b] - points[a]) / 1e9)
    order = {p: i for i, p in enumerate(POINTS)}
    rows = []
    for (a, b), values in sorted(hops.items(), key=lambda kv: (order[kv[0][0]], order[kv[0][1]])):
        rows.append(
            {
                "from": a,
                "to": b,
                "tasks": len(values),
                "p50_ms": ms(percentile(values, 0.5)),
                "p99_ms": ms(percentile(values, 0.99)),
            }
        )
    return rows


async def bench(args: argparse.Namespace, children: Children) -> dict[str, Any]:
    deadline = Deadline(args.deadline)
    report: dict[str, Any] = {"meta": meta(args)}
    workdir = Path(tempfile.mkdtemp(prefix="shoal-bench-roundtrip-"))
    cluster: Cluster | None = None
    try:
        cluster = await start_cluster(args.shoal, workdir, 1, args.slots, children, deadline)
        token = admin_token(workdir / "data")
        trace = Trace()
        async with AsyncClient(cluster.address, token=token) as client:
            await wait_nodes(client, 1, children, deadline)
            for _ in range(args.warmup):
                await trip(client, trace)
            tasks: list[task_pb2.Task] = []
            totals: list[float] = []
            meter, started = CpuMeter(cluster.pids()), time.monotonic()
            for i in range(args.trips):
                if i % 50 == 0:
                    deadline.check("the round trips")
                    children.check_alive()
                task = await trip(client, trace)
                tasks.append(task)
                points = trace.points[task.id]
                totals.append((points["Wait answered"] - points["submit sent"]) / 1e9)
            # CPU per trip moves less than time when the machine is shared: it tells whether
            # a change did less work, where latency alone is drowned in noise.
            cpu, wall = meter.percent(), time.monotonic() - started
            floors = [
                await asyncio.to_thread(commit_floor, workdir / "floor.db", args.trips),
                await call_floor(cluster.address, args.trips),
            ]
            async with asyncio.timeout(deadline.left(30.0)):
                await replay(client, trace, tasks[0].created_seq - 1, tasks[-1].id)
        ids = [t.id for t in tasks]
        hops = breakdown(trace, ids)
        report.update(trips=len(totals), hops=hops)
        report["figures"] = [
            figure(
                "round trip p50, one task at a time", ms(percentile(totals, 0.5)), "ms", "rt_p50"
            ),
            figure(
                "round trip p99, one task at a time", ms(percentile(totals, 0.99)), "ms", "rt_p99"
            ),
        ]
        for name, values in floors:
            report["figures"].append(
                figure(f"floor: {name} p50", ms(percentile(values, 0.5)), "ms")
            )
            report["figures"].append(
                figure(f"floor: {name} p99", ms(percentile(values, 0.99)), "ms")
            )
        for who, pct in cpu.items():
            per_trip = pct / 100 * wall / max(len(totals), 1) * 1000
            report["figures"].append(figure(f"CPU of the {who} per trip", round(per_trip, 3), "ms"))
        for hop in hops:
            name = f"hop {hop['from']} → {hop['to']}"
            note = "" if hop["tasks"] == len(totals) else f"{hop['tasks']} tasks"
            report["figures"].append(figure(f"{name} p50", hop["p50_ms"], "ms", note=note))
            report["figures"].append(figure(f"{name} p99", hop["p99_ms"], "ms", note=note))
    except BenchError as err:
        report["error"] = str(err)
    except ShoalError as err:
        report["error"] = f"a call failed: {err}"
    except TimeoutError:
        report["error"] = "the events of the trips were not all read back within 30 s"
    finally:
        if cluster is not None:
            for child in [*cluster.nodes, cluster.coordinator]:
                children.stop(child)
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Sequential round trips of a no-op task: p50/p99 and the time per hop.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--trips", type=int, default=500, help="measured round trips")
    p.add_argument("--warmup", type=int, default=50, help="round trips before measuring")
    p.add_argument("--slots", type=int, default=4, help="slots of the node")
    p.add_argument("--deadline", type=float, default=120.0, help="bound on the whole run, s")
    p.add_argument("--out", type=Path, default=RESULTS / "roundtrip.json", help="JSON output")
    p.add_argument("--shoal", default=default_shoal(), help="the shoal CLI")
    args = p.parse_args(argv)
    if args.trips < 1 or args.warmup < 0 or args.slots < 1:
        p.error("--trips and --slots must be at least 1, --warmup not negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return finish(run_async(lambda children: bench(args, children)), args.out)


if __name__ == "__main__":
    sys.exit(main())
