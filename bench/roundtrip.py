"""Sequential round trips: one no-op task at a time, submitted and then waited for.

What is measured: --trips round trips of one no-op task through the SDK (default 500 of
each kind, after --warmup), one at a time, the two kinds taking turns:

    one call     `execute`: a Submit that answers once the task has ended
    two calls    `submit`, then `wait` for the task

One coordinator
(durable store, synchronous=FULL) and one node run as `shoal` CLI processes on loopback.
Figures: p50/p99 of each kind's round trip (submit sent to the ending answered) against
issue 24's targets, the CPU time per trip of each process (both kinds), and a breakdown hop by
hop for each kind, from times the path
already records (all processes share the machine's wall clock):

    submit sent         this client, before the call
    Submit committed    the QUEUED event's time (published after the commit)
    dispatched          the ASSIGNED event's time
    started received    the RUNNING event's time: the node received it and said it started
    finish received     the task's finished_at: the node's result reached the coordinator
    outcome committed   the final event's time (published after the commit)
    answered            this client, when the call that waits returned

The events are read back after the trips (`Watch` from the first one's sequence number),
so no watcher adds its work to the trips measured.

Two floors, measured in the same run, tell how far below the figures a trip can go on this
machine: a one-row SQLite commit with synchronous=FULL on the store's disk (a trip makes two,
the acceptance and the outcome), and a bare gRPC call from this client to the coordinator
(`grpc.health.v1.Health/Check`, which touches no store; a trip makes two calls and sends two
stream messages).

    .venv/bin/python bench/roundtrip.py                # writes bench/results/roundtrip.json
    .venv/bin/python bench/roundtrip.py --trips 200
    .venv/bin/python bench/roundtrip.py --peers   # and Ray's and Dramatiq's, in the same run
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
from peer_runs import peer_figures, run_peers

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
    "answered",
)
KINDS = ("one call", "two calls")
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


async def trip(client: AsyncClient, trace: Trace, kind: str) -> task_pb2.Task:
    """One round trip of `kind`; returns the task as it ended."""
    sent = time.time_ns()
    if kind == "one call":
        done = await client.execute(noop())
    else:
        task = await client.submit(noop())
        done = await client.wait(task.id)
    answered = time.time_ns()
    if done.state != task_pb2.TASK_STATE_SUCCEEDED:
        raise BenchError(f"task {done.id} ended {task_pb2.TaskState.Name(done.state)}")
    trace.note(done.id, "submit sent", sent)
    trace.note(done.id, "answered", answered)
    if done.HasField("finished_at"):
        trace.note(done.id, "finish received", done.finished_at.ToNanoseconds())
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
            for i in range(args.warmup):
                await trip(client, trace, KINDS[i % 2])
            tasks: dict[str, list[task_pb2.Task]] = {kind: [] for kind in KINDS}
            totals: dict[str, list[float]] = {kind: [] for kind in KINDS}
            meter, started = CpuMeter(cluster.pids()), time.monotonic()
            for i in range(2 * args.trips):
                if i % 50 == 0:
                    deadline.check("the round trips")
                    children.check_alive()
                kind = KINDS[i % 2]  # taking turns: both meet the same machine
                task = await trip(client, trace, kind)
                tasks[kind].append(task)
                points = trace.points[task.id]
                totals[kind].append((points["answered"] - points["submit sent"]) / 1e9)
            # CPU per trip moves less than time when the machine is shared: it tells whether
            # a change did less work, where latency alone is drowned in noise.
            cpu, wall = meter.percent(), time.monotonic() - started
            floors = [
                await asyncio.to_thread(commit_floor, workdir / "floor.db", args.trips),
                await call_floor(cluster.address, args.trips),
            ]
            first = min(t.created_seq for kind in KINDS for t in tasks[kind])
            last = max((t for kind in KINDS for t in tasks[kind]), key=lambda t: t.created_seq)
            async with asyncio.timeout(deadline.left(30.0)):
                await replay(client, trace, first - 1, last.id)
        hops = {kind: breakdown(trace, [t.id for t in tasks[kind]]) for kind in KINDS}
        report.update(trips=args.trips, hops=hops)
        report["figures"] = []
        for kind in KINDS:
            for q, name in ((0.5, "p50"), (0.99, "p99")):
                value = ms(percentile(totals[kind], q))
                report["figures"].append(
                    figure(f"round trip {name}, {kind}", value, "ms", f"rt_{name}")
                )
        for name, values in floors:
            report["figures"].append(
                figure(f"floor: {name} p50", ms(percentile(values, 0.5)), "ms")
            )
            report["figures"].append(
                figure(f"floor: {name} p99", ms(percentile(values, 0.99)), "ms")
            )
        for who, pct in cpu.items():
            per_trip = pct / 100 * wall / (2 * args.trips) * 1000
            report["figures"].append(figure(f"CPU of the {who} per trip", round(per_trip, 3), "ms"))
        for kind in KINDS:
            for hop in hops[kind]:
                name = f"{kind}: {hop['from']} → {hop['to']}"
                note = "" if hop["tasks"] == args.trips else f"{hop['tasks']} tasks"
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
    p.add_argument(
        "--peers",
        action="store_true",
        help="then Ray's and Dramatiq's round trips (bench/peer_runs.py), as many",
    )
    args = p.parse_args(argv)
    if args.trips < 1 or args.warmup < 0 or args.slots < 1:
        p.error("--trips and --slots must be at least 1, --warmup not negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = run_async(lambda children: bench(args, children))
    if report is not None and args.peers:
        # Their throughput run is kept short: this benchmark is about one task at a time.
        peers = run_peers(1_000, args.trips, args.deadline)
        report["peers"] = peers
        report.setdefault("figures", []).extend(peer_figures(peers))
    return finish(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
