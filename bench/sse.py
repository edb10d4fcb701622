"""Live events over HTTP: what the SSE stream (GET /api/events) carries to 10 subscribers,
and the coordinator's throughput with them open beside it with none.

A coordinator (HTTP on) and one node run as `shoal` CLI processes on loopback, as in
bench/throughput.py, whose closed loop of no-op tasks this reuses. Two phases, each the same
number of tasks: with no SSE subscriber, then with --subscribers of them (every event, as the
dashboard's feed asks), each its own HTTP connection in one separate process (this file with
--subscribe), so that reading them costs this client nothing. The subscribers count the
events, messages and bytes they receive per second; events/s is what they received during
the phase (a message carries the events of about COALESCE_SECONDS).

    .venv/bin/python bench/sse.py                     # 50,000 tasks a phase, 10 subscribers
    .venv/bin/python bench/sse.py --tasks 20000 --subscribers 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from _common import (
    RESULTS,
    BenchError,
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
    run_async,
    start_coordinator,
    wait_listening,
    wait_nodes,
)
from throughput import Phase, Tracker, run_throughput, summarise, warm_up

from shoal import AsyncClient

_DASHBOARD = re.compile(r"dashboard(?: on|:) (http://127\.0\.0\.1:\d+/)")


# -- the subscribers' process ------------------------------------------------------------


async def subscribe(url: str, token: str, count: int) -> dict[str, Any]:
    """`count` subscribers of every event until SIGTERM; then what each received a second."""
    events: list[Counter[int]] = [Counter() for _ in range(count)]
    sizes: list[Counter[int]] = [Counter() for _ in range(count)]
    messages: list[Counter[int]] = [Counter() for _ in range(count)]
    errors: list[str] = []

    async def one(i: int, http: httpx.AsyncClient) -> None:
        async with http.stream(
            "GET", "/api/events", headers={"Authorization": f"Bearer {token}"}
        ) as r:
            if r.status_code != 200:
                errors.append(f"{r.status_code} {(await r.aread())[:200]!r}")
                return
            async for chunk in r.aiter_raw():
                second = int(time.time())
                events[i][second] += chunk.count(b'"seq":')
                sizes[i][second] += len(chunk)
                messages[i][second] += chunk.count(b"\ndata: ")
                if b"event: error" in chunk:
                    errors.append(f"subscriber {i} was cut: {chunk[-300:]!r}")

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    limits = httpx.Limits(max_connections=count + 1)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as http:
        readers = [asyncio.create_task(one(i, http)) for i in range(count)]
        await stop.wait()
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    return {
        "events": [dict(c) for c in events],
        "bytes": [dict(c) for c in sizes],
        "messages": [dict(c) for c in messages],
        "errors": errors,
    }


# -- the benchmark ------------------------------------------------------------------------


def _window(counts: list[dict[str, int]], start: float, end: float) -> list[int]:
    """Per subscriber, what it received in the whole seconds from `start` to `end`."""
    first, last = int(start), int(end)
    return [sum(n for s, n in c.items() if first <= int(s) <= last) for c in counts]


async def bench(args: argparse.Namespace, children: Children) -> dict[str, Any]:
    deadline = Deadline(args.deadline)
    report: dict[str, Any] = {"meta": meta(args), "phases": []}
    workdir = Path(tempfile.mkdtemp(prefix="shoal-bench-sse-"))
    try:
        coordinator = start_coordinator(
            args.shoal,
            workdir,
            children,
            settings={"SHOAL_COORDINATOR_HTTP_LISTEN": "127.0.0.1:0"},
        )
        address = await wait_listening(coordinator, children, deadline)
        match = _DASHBOARD.search(coordinator.log_path.read_text())
        if match is None:
            raise BenchError(f"the coordinator printed no dashboard URL:\n{coordinator.tail()}")
        url = match.group(1)
        node = children.spawn(
            "node0",
            [
                args.shoal,
                "node",
                "-c",
                address,
                "--slots",
                str(args.slots),
                "--node-id",
                "bench-node-0",
            ],
            workdir / "node0.log",
            child_env(workdir),
        )
        token = admin_token(workdir / "data")
        pids = {"coordinator": [coordinator.proc.pid], "node": [node.proc.pid]}
        async with AsyncClient(address, token=token) as client:
            await wait_nodes(client, 1, children, deadline)
            tracker = Tracker(client)
            watcher = asyncio.create_task(tracker.run())
            try:
                await warm_up(client, tracker, args.batch, deadline)
                for subscribers in (0, args.subscribers):
                    counts = workdir / f"subscribers-{subscribers}.json"
                    sub = None
                    if subscribers:
                        sub = children.spawn(
                            "subscribers",
                            [
                                sys.executable,
                                __file__,
                                "--subscribe",
                                url,
                                "--subscribers",
                                str(subscribers),
                                "--out",
                                str(counts),
                            ],
                            workdir / "subscribers.log",
                            child_env(workdir, {"BENCH_TOKEN": token}),
                        )
                        await asyncio.sleep(1.0)  # connected, and past their first message
                    meter = CpuMeter({**pids, **({"subscribers": [sub.proc.pid]} if sub else {})})
                    start = time.time()
                    phase: Phase = await run_throughput(client, tracker, args, deadline)
                    end = time.time()
                    row = summarise(phase, meter.percent(), None)
                    row.pop("timeline", None)
                    row["subscribers"] = subscribers
                    if sub is not None:
                        children.stop(sub)
                        got = json.loads(counts.read_text())
                        received = _window(got["events"], start, end)
                        span = max(end - start, 1e-9)
                        row["sse_events_per_s_each"] = [round(n / span) for n in received]
                        row["sse_events_per_s_total"] = round(sum(received) / span)
                        row["sse_mb_per_s_total"] = round(
                            sum(_window(got["bytes"], start, end)) / span / 1e6, 2
                        )
                        row["sse_messages_per_s_each"] = [
                            round(n / span) for n in _window(got["messages"], start, end)
                        ]
                        row["sse_errors"] = got["errors"]
                    report["phases"].append(row)
                    print(
                        f"{subscribers} subscribers: {row['tasks_per_s']} tasks/s", file=sys.stderr
                    )
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await watcher
        report["figures"] = figures(report["phases"])
    except BenchError as err:
        report["error"] = str(err)
    finally:
        children.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return report


def figures(phases: Sequence[dict[str, Any]]) -> list[Figure]:
    out = []
    for row in phases:
        n = row["subscribers"]
        out.append(figure(f"no-op tasks/s, {n} SSE subscribers", row["tasks_per_s"], "tasks/s"))
        out.append(
            figure(
                f"coordinator CPU, {n} SSE subscribers", row["cpu_percent"].get("coordinator"), "%"
            )
        )
        if n:
            out.append(
                figure(
                    f"SSE events/s to {n} subscribers (sum)",
                    row["sse_events_per_s_total"],
                    "events/s",
                )
            )
            each = row["sse_events_per_s_each"]
            out.append(
                figure("SSE events/s, slowest subscriber", min(each) if each else None, "events/s")
            )
            out.append(
                figure(f"SSE MB/s to {n} subscribers (sum)", row["sse_mb_per_s_total"], "MB/s")
            )
            messages = row["sse_messages_per_s_each"]
            out.append(
                figure(
                    "SSE messages/s, busiest subscriber (events coalesced)",
                    max(messages) if messages else None,
                    "messages/s",
                )
            )
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="SSE events/s to subscribers, and throughput with them open vs none.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--subscribers", type=int, default=10, help="SSE subscribers in phase 2")
    p.add_argument("--tasks", type=int, default=50_000, help="no-op tasks per phase")
    p.add_argument("--batch", type=int, default=1000, help="tasks per SubmitBatch")
    p.add_argument("--inflight", type=int, default=4, help="unfinished batches at once")
    p.add_argument("--slots", type=int, default=256, help="the node's slots")
    p.add_argument("--phase-timeout", type=float, default=60.0, help="bound on a phase, s")
    p.add_argument("--deadline", type=float, default=240.0, help="bound on the whole run, s")
    p.add_argument("--out", type=Path, default=RESULTS / "sse.json", help="JSON output")
    p.add_argument("--keep", action="store_true", help="keep the data dir and logs")
    p.add_argument("--shoal", default=default_shoal(), help="the shoal CLI")
    p.add_argument("--subscribe", metavar="URL", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> int:
    args = parse_args()
    if args.subscribe:  # the subscribers' own process
        got = asyncio.run(subscribe(args.subscribe, os.environ["BENCH_TOKEN"], args.subscribers))
        args.out.write_text(json.dumps(got))
        return 0
    return finish(run_async(lambda children: bench(args, children)), args.out)


if __name__ == "__main__":
    sys.exit(main())
