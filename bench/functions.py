"""Python functions through the mesh: calls per second beside the no-op executor's tasks per
second, and sequential round trips of a trivial function beside those of a no-op task.

One coordinator (durable store, synchronous=FULL) and one node (`--import fn_tasks`, so its
warm workers hold bench/fn_tasks.py) run as `shoal` CLI processes on loopback. Throughput:
--tasks no-op tasks and --tasks calls of `square`, in --turns rounds that each run a share of
both (each share submitted in one SubmitBatch, `map` for the calls, and waited for through one
Watch of outcomes), so that the machine's drifting speed slows both alike. Round trips:
`trivial.call()` (submitted and waited for in one call), one at a time, and the same with a
no-op task.

The goal (calls per second within 20% of the no-op executor's tasks per second) is the
machine's: each kind at its best slot count ("at most"). At few slots both are bound by the
round trip rather than the cores, and a call's crosses one more process (node, worker, node),
so its share there is lower; at many, calls go to a worker in larger batches.

    .venv/bin/python bench/functions.py              # writes bench/results/functions.json
    .venv/bin/python bench/functions.py --tasks 5000 --turns 5 --trips 200 --slots 16
    .venv/bin/python bench/functions.py --peers   # and Ray's and Dramatiq's, in the same run
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import fn_tasks
import psutil
from _common import (
    RESULTS,
    BenchError,
    Children,
    Cluster,
    Deadline,
    admin_token,
    child_env,
    default_shoal,
    figure,
    finish,
    meta,
    ms,
    percentile,
    run_async,
    start_coordinator,
    wait_listening,
    wait_nodes,
)
from peer_runs import peer_figures, run_peers

import shoal
from shoal import AsyncClient, noop
from shoal.errors import ShoalError
from shoal.specs import FINAL_STATES
from shoal.v1 import task_pb2

BENCH = Path(__file__).resolve().parent


async def _outcomes(client: AsyncClient, ids: Sequence[str], since: int) -> None:
    """Return once every task of `ids` has ended (BenchError unless each succeeded)."""
    left = set(ids)
    async for event in client.watch(since=since, states=FINAL_STATES):
        if event.task_id in left:
            if event.state != task_pb2.TASK_STATE_SUCCEEDED:
                raise BenchError(f"task {event.task_id} failed: {event.result.error}")
            left.discard(event.task_id)
            if not left:
                return


def cpu_seconds(cluster: Cluster) -> dict[str, float]:
    """CPU time so far of the coordinator, the node, its function workers and this client."""
    node = psutil.Process(cluster.nodes[0].proc.pid)
    groups = {
        "coordinator": [psutil.Process(cluster.coordinator.proc.pid)],
        "node": [node],
        "workers": node.children(recursive=True),
        "client": [psutil.Process()],
    }
    out: dict[str, float] = {}
    for name, procs in groups.items():
        out[name] = 0.0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                out[name] += t.user + t.system
    return out


async def noop_rate(client: AsyncClient, n: int) -> float:
    """No-op tasks per second: `n` submitted in one SubmitBatch, waited for by one Watch."""
    started = time.perf_counter()
    ids = await client.submit_batch([noop()] * n)
    first = await client.get(ids[0])
    await _outcomes(client, ids, first.created_seq - 1)
    return n / (time.perf_counter() - started)


async def function_rate(client: AsyncClient, n: int) -> float:
    """Calls of `square` per second: `n` mapped in one SubmitBatch, their typed results
    gathered by one Watch."""
    started = time.perf_counter()
    handles = await fn_tasks.square.async_map(client, range(n))
    results = await shoal.async_gather(handles)
    if results[-1] != (n - 1) ** 2:
        raise BenchError("a wrong result")
    return n / (time.perf_counter() - started)


async def rates_in_turns(
    client: AsyncClient, cluster: Cluster, n: int, turns: int
) -> dict[str, Any]:
    """Both rates over `turns` rounds that each run n/turns no-op tasks, then as many calls:
    a machine whose speed drifts during the run slows both alike. The share of each turn (how
    much the machine's noise moves it), and their CPU time per task, by process group."""
    chunk = max(1, n // turns)
    spent = {"noop": 0.0, "function": 0.0}
    shares: list[float] = []
    cpu: dict[str, dict[str, float]] = {"noop": {}, "function": {}}
    for _ in range(turns):
        took = {}
        for kind, rate in (("noop", noop_rate), ("function", function_rate)):
            before = cpu_seconds(cluster)
            took[kind] = chunk / await rate(client, chunk)
            spent[kind] += took[kind]
            after = cpu_seconds(cluster)
            for group, seconds in after.items():
                cpu[kind][group] = cpu[kind].get(group, 0.0) + seconds - before[group]
        shares.append(took["noop"] / took["function"])
    done = chunk * turns
    return {
        "noop_per_s": done / spent["noop"],
        "function_per_s": done / spent["function"],
        "turn_shares": sorted(shares),
        "cpu_us_per_task": {
            kind: {group: round(1e6 * s / done) for group, s in groups.items()}
            for kind, groups in cpu.items()
        },
    }


async def trips(call: Callable[[], Awaitable[object]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await call()
        out.append(time.perf_counter() - t)
    return out


async def one_node(
    args: argparse.Namespace, children: Children, deadline: Deadline, slots: int, trips_too: bool
) -> dict[str, Any]:
    """A coordinator and one node of `slots` slots: both rates in turns, and (`trips_too`) the
    round trips of each kind."""
    out: dict[str, Any] = {"slots": slots}
    workdir = Path(tempfile.mkdtemp(prefix="shoal-bench-functions-"))
    cluster: Cluster | None = None
    try:
        coordinator = start_coordinator(args.shoal, workdir, children)
        address = await wait_listening(coordinator, children, deadline)
        env = child_env(workdir, {"PYTHONPATH": str(BENCH)})
        argv = [args.shoal, "node", "-c", address, "--slots", str(slots)]
        node = children.spawn("node", [*argv, "--import", "fn_tasks"], workdir / "node.log", env)
        cluster = Cluster(coordinator, address, [node])
        async with AsyncClient(address, token=admin_token(workdir / "data")) as client:
            await wait_nodes(client, 1, children, deadline, within=60)

            # Each in one call (a Submit that answers once the task has ended).
            async def call_function() -> None:
                await fn_tasks.trivial.async_call(client)

            async def call_noop() -> None:
                task = await client.execute(noop())
                if task.state != task_pb2.TASK_STATE_SUCCEEDED:
                    raise BenchError(f"a no-op task failed: {task.result.error}")

            await trips(call_function, args.warmup)
            await trips(call_noop, args.warmup)
            await noop_rate(client, min(args.tasks, 1000))  # warm up both paths
            await function_rate(client, min(args.tasks, 1000))
            deadline.check("warm-up")
            out.update(await rates_in_turns(client, cluster, args.tasks, args.turns))
            share = out["function_per_s"] / out["noop_per_s"]
            print(f"{slots} slots: {share:.0%}, CPU us per task {out['cpu_us_per_task']}")
            deadline.check("throughput")
            if trips_too:
                out["function_trips"] = await trips(call_function, args.trips)
                out["noop_trips"] = await trips(call_noop, args.trips)
    finally:
        if cluster is not None:
            for child in [*cluster.nodes, cluster.coordinator]:
                children.stop(child)
        shutil.rmtree(workdir, ignore_errors=True)
    return out


async def bench(args: argparse.Namespace, children: Children) -> dict[str, Any]:
    deadline = Deadline(args.deadline)
    report: dict[str, Any] = {"meta": meta(args), "cpu_us_per_task": {}}
    figures: list[Any] = []
    best: dict[str, tuple[float, int]] = {}  # each kind's highest rate, and its slot count
    try:
        for i, slots in enumerate(args.slots):
            run = await one_node(args, children, deadline, slots, trips_too=i == 0)
            for kind in ("noop_per_s", "function_per_s"):
                best[kind] = max(best.get(kind, (0.0, 0)), (run[kind], slots))
            share = run["function_per_s"] / run["noop_per_s"]
            turns = run["turn_shares"]
            report["cpu_us_per_task"][slots] = run["cpu_us_per_task"]
            figures += [
                figure(f"no-op tasks per second, {slots} slots", run["noop_per_s"], "tasks/s"),
                figure(
                    f"function calls per second, {slots} slots",
                    run["function_per_s"],
                    "calls/s",
                    note=f"{share:.0%} of the no-op rate at {slots} slots (turns"
                    f" {turns[0]:.0%} to {turns[-1]:.0%}, middle half"
                    f" {percentile(turns, 0.25):.0%} to {percentile(turns, 0.75):.0%})",
                ),
            ]
            if i == 0:
                fn_trips, noop_trips = run["function_trips"], run["noop_trips"]
                trip_figures = [
                    figure("function round trip p50", ms(percentile(fn_trips, 0.5)), "ms"),
                    figure("function round trip p99", ms(percentile(fn_trips, 0.99)), "ms"),
                    figure("no-op round trip p50", ms(percentile(noop_trips, 0.5)), "ms"),
                    figure("no-op round trip p99", ms(percentile(noop_trips, 0.99)), "ms"),
                ]
        if len(args.slots) > 1:  # what the machine does at most, each kind at its best
            (noop, noop_slots), (calls, call_slots) = best["noop_per_s"], best["function_per_s"]
            figures.append(
                figure(
                    "function calls per second, at most",
                    calls,
                    "calls/s",
                    note=f"{calls / noop:.0%} of the most no-op tasks per second (goal: at"
                    f" least 80%; calls: {call_slots} slots, no-op tasks: {noop_slots})",
                )
            )
        report["figures"] = figures + trip_figures
    except ShoalError as err:
        report["error"] = f"a call failed: {err}"
    return report


def _slot_counts(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",") if part.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("slot counts of at least 1, comma-separated")
    return counts


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Function calls per second and round trips, beside no-op tasks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--tasks", type=int, default=30_000, help="tasks (and calls) per rate")
    p.add_argument("--trips", type=int, default=300, help="measured round trips of each")
    p.add_argument(
        "--turns", type=int, default=15, help="rounds the two rates take turns in (a batch each)"
    )
    p.add_argument("--warmup", type=int, default=30, help="round trips before measuring")
    p.add_argument(
        "--slots",
        type=_slot_counts,
        default=[4, 16, 64, 128],
        help="slots (and function workers) of the node: one run for each count",
    )
    p.add_argument("--deadline", type=float, default=300.0, help="bound on the whole run, s")
    p.add_argument("--out", type=Path, default=RESULTS / "functions.json", help="JSON output")
    p.add_argument("--shoal", default=default_shoal(), help="the shoal CLI")
    p.add_argument(
        "--peers",
        action="store_true",
        help="also run Ray and Dramatiq (bench/peer_runs.py) with the same calls and trips",
    )
    args = p.parse_args(argv)
    if min(args.tasks, args.trips, args.turns) < 1 or args.tasks > 10_000 * args.turns:
        p.error(
            "--tasks, --trips and --turns must be at least 1, and a turn's share of --tasks"
            " at most 10,000 (one batch)"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = run_async(lambda children: bench(args, children))
    if report is not None and args.peers:
        peers = run_peers(args.tasks, args.trips, args.deadline)
        report["peers"] = peers
        report.setdefault("figures", []).extend(peer_figures(peers))
    return finish(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
