"""Coordinator CPU with many node sessions heartbeating (the target: 3,000 at < 25% of a core).

What is measured: for each size in --sizes (default 1000,3000), a fresh coordinator and that
many simulated nodes: `NodeGateway.Connect` streams that send Hello (NodeInfo: the `noop`
executor, one slot), then a Heartbeat every heartbeat_interval (the Welcome names it: 3 s by
default; a LeaseRenewed may slow it, when the sessions' heartbeats together would pass the
coordinator's max_heartbeat_rate), and read and drop whatever else the coordinator sends.
--max-heartbeat-rate 1e9 keeps every session at the configured interval. They authenticate with the
coordinator's admin token. The sessions are spread over simulator processes (--per-process,
default 500: this file run as `nodes.py simulate`), --per-channel streams to a channel (its
own TCP connection), and open at --connect-rate per process. Once ListNodes counts every
session and --settle seconds passed, the coordinator's CPU is averaged over --window seconds:
% of one core, beside the target from 3,000 sessions on. Also: its RSS, the simulators' CPU
(they share the machine's cores with it), and heartbeats sent and acknowledged (LeaseRenewed).

The coordinator reads at most node_message_rate messages/s of a session (default 2,000, burst
4,000): one heartbeat every few s is far under it, so no heartbeat is throttled.

    .venv/bin/python bench/nodes.py                      # writes bench/results/nodes.json
    .venv/bin/python bench/nodes.py --sizes 100,300 --window 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from _common import (
    RESULTS,
    BenchError,
    Child,
    Children,
    CpuMeter,
    Deadline,
    Figure,
    admin_token,
    child_env,
    default_shoal,
    figure,
    finish,
    meta,
    rss_mb,
    run_async,
    start_coordinator,
    wait_listening,
    wait_nodes,
)

from shoal import AsyncClient, __version__
from shoal.config import ADMIN_TOKEN_FILE, CoordinatorSettings
from shoal.v1 import gateway_pb2_grpc, node_pb2

_SELF = Path(__file__).resolve()

# -- the simulator (one process: `nodes.py simulate ...`) -----------------------------------


@dataclass
class SimStats:
    welcomed: int = 0
    heartbeats: int = 0
    acks: int = 0  # LeaseRenewed received
    interval_s: float = 0.0  # the longest heartbeat interval the coordinator named
    ended: int = 0  # sessions that ended before the simulator was stopped
    errors: Counter[str] = field(default_factory=Counter)


async def _drop(call: Any, stats: SimStats, interval: list[float]) -> None:
    """Read what the coordinator sends until the stream ends; count the lease renewals, and
    follow the pace they name (`interval`: the one heartbeat interval, s, updated in place)."""
    while (message := await call.read()) is not grpc.aio.EOF:
        if message.WhichOneof("msg") == "lease":
            stats.acks += 1
            if message.lease.HasField("heartbeat_interval"):
                interval[0] = message.lease.heartbeat_interval.ToTimedelta().total_seconds()
                stats.interval_s = max(stats.interval_s, interval[0])


async def _session(stub: Any, node_id: str, metadata: Any, stats: SimStats) -> None:
    """One node: Hello, then heartbeats until the stream ends or the task is cancelled."""
    info = node_pb2.NodeInfo(
        node_id=node_id, hostname="nodes-bench", version=__version__, executors=["noop"], slots=1
    )
    call = stub.Connect(metadata=metadata)
    reader: asyncio.Task[None] | None = None
    try:
        await call.write(node_pb2.NodeMessage(hello=node_pb2.Hello(info=info)))
        first = await call.read()
        if first is grpc.aio.EOF or first.WhichOneof("msg") != "welcome":
            raise asyncio.InvalidStateError("no Welcome")
        stats.welcomed += 1
        interval = [first.welcome.heartbeat_interval.ToTimedelta().total_seconds() or 2.0]
        stats.interval_s = max(stats.interval_s, interval[0])
        reader = asyncio.create_task(_drop(call, stats, interval))
        loop = asyncio.get_running_loop()
        next_at = loop.time() + random.uniform(0, interval[0])  # spread the heartbeats evenly
        seq = 0
        while not reader.done():
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            seq += 1
            beat = node_pb2.Heartbeat(seq=seq, free_slots=1)
            await call.write(node_pb2.NodeMessage(heartbeat=beat))
            stats.heartbeats += 1
            next_at += interval[0]
        stats.ended += 1
    except grpc.aio.AioRpcError as err:
        stats.ended += 1
        stats.errors[err.code().name] += 1
    except asyncio.InvalidStateError as err:
        stats.ended += 1
        stats.errors[str(err)] += 1
    finally:
        if reader is not None:
            reader.cancel()
        call.cancel()


async def simulate(args: argparse.Namespace) -> SimStats:
    """Open `count` sessions at `connect_rate` per second and keep them until SIGTERM."""
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    metadata = (("authorization", f"Bearer {args.token_file.read_text().strip()}"),)
    options = [("grpc.use_local_subchannel_pool", 1)]  # a TCP connection per channel
    n_channels = math.ceil(args.count / args.per_channel)
    channels = [grpc.aio.insecure_channel(args.target, options=options) for _ in range(n_channels)]
    stubs = [gateway_pb2_grpc.NodeGatewayStub(channel) for channel in channels]
    stats = SimStats()
    sessions: list[asyncio.Task[None]] = []
    try:
        for i in range(args.count):
            node_id = f"sim-{args.first + i}"
            stub = stubs[i // args.per_channel]
            sessions.append(asyncio.create_task(_session(stub, node_id, metadata, stats)))
            await asyncio.sleep(1 / args.connect_rate)
        await asyncio.gather(*sessions)
    except asyncio.CancelledError:
        pass  # SIGTERM: the run is over
    finally:
        for task in sessions:
            task.cancel()
        await asyncio.gather(*sessions, return_exceptions=True)
        for channel in channels:
            await channel.close()
    return stats


def simulator_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="nodes.py simulate", description="Simulated node sessions.")
    p.add_argument("--target", required=True, help="the coordinator, host:port")
    p.add_argument("--token-file", type=Path, required=True)
    p.add_argument("--first", type=int, default=0, help="the number of the first node id")
    p.add_argument("--count", type=int, required=True, help="sessions")
    p.add_argument("--per-channel", type=int, default=100, help="streams to a channel")
    p.add_argument("--connect-rate", type=float, default=100.0, help="sessions opened per s")
    p.add_argument("--stats", type=Path, required=True, help="JSON written at exit")
    args = p.parse_args(argv)
    stats = asyncio.run(simulate(args))
    args.stats.write_text(json.dumps(asdict(stats)))
    return 0


# -- the benchmark -------------------------------------------------------------------------


async def _watch(seconds: float, children: Children) -> None:
    """Let `seconds` pass, checking every second that every process lives."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        children.check_alive()
        await asyncio.sleep(min(1.0, left))


def _sum_stats(paths: Sequence[Path]) -> dict[str, Any]:
    total: dict[str, Any] = {"reported": 0, "errors": Counter()}
    for path in paths:
        with contextlib.suppress(OSError, ValueError):
            stats = json.loads(path.read_text())
            total["reported"] += 1
            for key in ("welcomed", "heartbeats", "acks", "ended"):
                total[key] = total.get(key, 0) + stats[key]
            total["errors"].update(stats["errors"])
            total["interval_s"] = max(total.get("interval_s", 0.0), stats["interval_s"])
    total["errors"] = dict(total["errors"])
    return total


async def run_size(
    n: int, args: argparse.Namespace, children: Children, deadline: Deadline
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"shoal-bench-nodes-{n}-"))
    result: dict[str, Any] = {"sessions": n}
    settings = {}
    if args.max_heartbeat_rate:
        settings["SHOAL_COORDINATOR_MAX_HEARTBEAT_RATE"] = str(args.max_heartbeat_rate)
    coordinator = start_coordinator(args.shoal, workdir, children, settings=settings)
    simulators: list[Child] = []
    try:
        address = await wait_listening(coordinator, children, deadline)
        started = time.monotonic()
        for k in range(math.ceil(n / args.per_process)):
            first = k * args.per_process
            argv = [sys.executable, str(_SELF), "simulate"]
            argv += ["--target", address, "--token-file", str(workdir / "data" / ADMIN_TOKEN_FILE)]
            argv += ["--first", str(first), "--count", str(min(args.per_process, n - first))]
            argv += ["--per-channel", str(args.per_channel)]
            argv += ["--connect-rate", str(args.connect_rate)]
            argv += ["--stats", str(workdir / f"simulator{k}.json")]
            log = workdir / f"simulator{k}.log"
            simulators.append(children.spawn(f"simulator{k}", argv, log, child_env(workdir)))
        token = admin_token(workdir / "data")
        async with AsyncClient(address, token=token, retry_for=timedelta(seconds=5)) as client:
            within = deadline.left(args.join_timeout)
            await wait_nodes(client, n, children, deadline, within=within, every=1.0)
            result["join_s"] = round(time.monotonic() - started, 1)
            print(f"  {n} sessions joined in {result['join_s']} s", file=sys.stderr, flush=True)
            await _watch(args.settle, children)
            pids = {"coordinator": [coordinator.proc.pid]}
            pids["simulators"] = [s.proc.pid for s in simulators]
            meter = CpuMeter(pids)
            await _watch(min(args.window, deadline.left()), children)
            result["cpu_percent"] = meter.percent()
            result["rss_mb"] = rss_mb(coordinator.proc.pid)
            result["sessions_after"] = len(await client.nodes())
    finally:
        for simulator in simulators:
            children.stop(simulator)
        result["simulators"] = _sum_stats(
            [workdir / f"simulator{k}.json" for k in range(len(simulators))]
        )
        children.stop(coordinator)
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def size_figures(run: dict[str, Any]) -> list[Figure]:
    n, sims = run["sessions"], run["simulators"]
    lost = n - run["sessions_after"]
    note = f"{lost} sessions lost" if lost else ""
    acked = sims.get("acks", 0) / sims["heartbeats"] * 100 if sims.get("heartbeats") else None
    return [
        figure(
            f"coordinator CPU, {n:,} node sessions",
            run["cpu_percent"]["coordinator"],
            "% of a core",
            "nodes_cpu" if n >= 3000 else "",
            note,
        ),
        figure(f"coordinator RSS, {n:,} node sessions", run["rss_mb"], "MB"),
        figure(f"all {n:,} sessions joined after", run["join_s"], "s"),
        figure(f"simulators' CPU, {n:,} sessions", run["cpu_percent"]["simulators"], "% of a core"),
        figure(f"heartbeat interval, {n:,} sessions", sims.get("interval_s"), "s"),
        figure(
            f"heartbeats acknowledged, {n:,} sessions",
            None if acked is None else round(acked, 1),
            "%",
        ),
    ]


async def bench(args: argparse.Namespace, children: Children) -> dict[str, Any]:
    deadline = Deadline(args.deadline)
    defaults = CoordinatorSettings.model_fields
    report: dict[str, Any] = {
        "meta": meta(args),
        "node_message_rate": defaults["node_message_rate"].default,
        "node_message_burst": defaults["node_message_burst"].default,
        "heartbeat_interval_s": defaults["heartbeat_interval"].default.total_seconds(),
        "max_heartbeat_rate": args.max_heartbeat_rate or defaults["max_heartbeat_rate"].default,
        "runs": [],
        "figures": [],
    }
    try:
        for n in args.sizes:
            deadline.check(f"the start of the {n}-session run")
            print(f"{n} node sessions: starting", file=sys.stderr, flush=True)
            run = await run_size(n, args, children, deadline)
            report["runs"].append(run)
            report["figures"] += size_figures(run)
    except BenchError as err:
        report["error"] = str(err)
    return report


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Coordinator CPU with many simulated node sessions heartbeating.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--sizes", type=_ints, default=[1000, 3000], help="sessions, comma-separated")
    p.add_argument("--per-process", type=int, default=500, help="sessions per simulator")
    p.add_argument("--per-channel", type=int, default=100, help="streams per channel")
    p.add_argument("--connect-rate", type=float, default=100.0, help="sessions/s per simulator")
    p.add_argument("--join-timeout", type=float, default=120.0, help="for all to join, s")
    p.add_argument("--settle", type=float, default=5.0, help="after all joined, s")
    p.add_argument("--window", type=float, default=20.0, help="CPU averaged over, s")
    p.add_argument("--deadline", type=float, default=600.0, help="bound on the whole run, s")
    p.add_argument(
        "--max-heartbeat-rate",
        type=float,
        default=None,
        help="the coordinator's max_heartbeat_rate (default: its own); 1e9 keeps every"
        " session at the configured interval",
    )
    p.add_argument("--out", type=Path, default=RESULTS / "nodes.json", help="JSON output")
    p.add_argument("--shoal", default=default_shoal(), help="the shoal CLI")
    args = p.parse_args(argv)
    if not args.sizes or min(args.sizes) < 1:
        p.error("--sizes needs sizes of at least 1")
    if min(args.per_process, args.per_channel) < 1 or args.connect_rate <= 0:
        p.error("--per-process and --per-channel must be at least 1, --connect-rate positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["simulate"]:
        return simulator_main(argv[1:])
    args = parse_args(argv)
    return finish(run_async(lambda children: bench(args, children)), args.out)


if __name__ == "__main__":
    sys.exit(main())
