"""Coordinator memory with queued tasks: MB of RSS per 100k queued, and RSS at 1M queued.

What is measured: the resident memory (psutil RSS) of a `shoal coordinator` process to which
no node connects, so every task submitted stays queued. --tasks no-op tasks (default
1,000,000) are submitted with SubmitBatch in batches of --batch, at most --inflight batches at
once; at 0 and every --every tasks (default 100,000) the submits pause until nothing is in
flight and the RSS is sampled. Figures: MB per 100k queued (the least-squares slope of RSS
against tasks queued) and the RSS at 1M (measured; extrapolated along the slope when --tasks
is smaller), beside their targets. The coordinator's queue cap (max_queued) is raised to
--tasks when that is larger.

--keep-data DIR keeps the coordinator's data dir (its store, with every task queued) at DIR,
for bench/recovery.py --data-dir DIR.

    .venv/bin/python bench/memory.py                         # writes bench/results/memory.json
    .venv/bin/python bench/memory.py --tasks 50000 --every 10000
    .venv/bin/python bench/memory.py --keep-data /tmp/store && \\
        .venv/bin/python bench/recovery.py --data-dir /tmp/store
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from _common import (
    RESULTS,
    BenchError,
    Child,
    Children,
    Deadline,
    Figure,
    admin_token,
    default_shoal,
    figure,
    finish,
    meta,
    rss_mb,
    run_async,
    start_coordinator,
    wait_listening,
)

from shoal import AsyncClient, noop
from shoal.errors import ShoalError

PER = 100_000  # the target is MB per this many queued tasks
AT = 1_000_000  # and the RSS with this many


def queue_cap(tasks: int) -> dict[str, str]:
    """Coordinator settings that let `tasks` tasks be queued at once."""
    return {"SHOAL_COORDINATOR_MAX_QUEUED": str(max(AT, tasks))}


async def fill(
    client: AsyncClient,
    total: int,
    *,
    batch: int,
    inflight: int,
    every: int,
    deadline: Deadline,
    mark: Callable[[int], None] = lambda queued: None,
) -> float:
    """Submit `total` no-op tasks; `mark(queued)` runs at 0 and after every `every` tasks, with
    no submit in flight. Returns the seconds spent submitting (marks excluded)."""
    specs = [noop()] * batch
    window = asyncio.Semaphore(inflight)

    async def submit(n: int) -> None:
        async with window:
            await client.submit_batch(specs[:n])

    queued, spent = 0, 0.0
    mark(0)
    while queued < total:
        upto = min(total, queued + every)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(max(0.0, deadline.left())), asyncio.TaskGroup() as group:
                for start in range(queued, upto, batch):
                    group.create_task(submit(min(batch, upto - start)))
        except* ShoalError as failed:
            raise BenchError(
                f"a submit failed at {queued:,} tasks: {failed.exceptions[0]}"
            ) from None
        except* TimeoutError:
            raise BenchError(f"the overall deadline passed at {queued:,} tasks") from None
        spent += time.perf_counter() - started
        queued = upto
        mark(queued)
    return spent


def slope(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares line through (x, y) points: (slope, intercept)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    k = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return k, my - k * mx


def memory_figures(samples: Sequence[dict[str, float]]) -> list[Figure]:
    points = [(s["queued"], s["rss_mb"]) for s in samples]
    k, base = slope(points)
    top, top_rss = points[-1]
    at_1m = next((rss for queued, rss in points if queued == AT), None)
    note = ""
    if at_1m is None:
        at_1m = base + k * AT
        note = f"extrapolated from {top:,.0f} tasks"
    return [
        figure("coordinator RSS, nothing queued", points[0][1], "MB"),
        figure(f"coordinator RSS, {top:,.0f} queued", top_rss, "MB"),
        figure("coordinator RSS per 100k queued", round(k * PER, 1), "MB", "mb_per_100k"),
        figure("coordinator RSS, 1M queued", round(at_1m, 1), "MB", "rss_1m", note),
    ]


async def bench(args: argparse.Namespace, children: Children) -> dict[str, Any]:
    deadline = Deadline(args.deadline)
    report: dict[str, Any] = {"meta": meta(args), "samples": []}
    workdir = Path(tempfile.mkdtemp(prefix="shoal-bench-memory-"))
    data = args.keep_data or workdir / "data"
    coordinator: Child | None = None
    try:
        settings = queue_cap(args.tasks)
        coordinator = start_coordinator(args.shoal, workdir, children, data=data, settings=settings)
        pid = coordinator.proc.pid
        address = await wait_listening(coordinator, children, deadline)
        started = time.perf_counter()

        def sample(queued: int) -> None:
            children.check_alive()
            rss = rss_mb(pid)
            at = round(time.perf_counter() - started, 2)
            report["samples"].append({"queued": queued, "rss_mb": rss, "t": at})
            print(f"  {queued:>9,} queued: RSS {rss:7.1f} MB", file=sys.stderr, flush=True)

        token = admin_token(data)
        async with AsyncClient(address, token=token, retry_for=timedelta(seconds=5)) as client:
            await client.list(limit=1)  # the channel and the call path are up before sample 0
            spent = await fill(
                client,
                args.tasks,
                batch=args.batch,
                inflight=args.inflight,
                every=args.every,
                deadline=deadline,
                mark=sample,
            )
        report["submit_tasks_per_s"] = round(args.tasks / spent, 1)
        report["figures"] = [
            *memory_figures(report["samples"]),
            figure(
                f"submitted tasks/s, batches of {args.batch:,}", round(args.tasks / spent), "/s"
            ),
        ]
    except BenchError as err:
        report["error"] = str(err)
    finally:
        if coordinator is not None:
            children.stop(coordinator, grace=30.0)  # it closes its store: let it finish
        shutil.rmtree(workdir, ignore_errors=True)
    if args.keep_data:
        report["data_dir"] = str(args.keep_data)
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Coordinator RSS per 100k and at 1M queued tasks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--tasks", type=int, default=AT, help="tasks to queue")
    p.add_argument("--batch", type=int, default=2000, help="tasks per SubmitBatch")
    p.add_argument("--inflight", type=int, default=4, help="SubmitBatch calls at once")
    p.add_argument("--every", type=int, default=PER, help="sample the RSS every this many tasks")
    p.add_argument("--deadline", type=float, default=600.0, help="bound on the whole run, s")
    p.add_argument("--keep-data", type=Path, default=None, help="keep the store at this dir")
    p.add_argument("--out", type=Path, default=RESULTS / "memory.json", help="JSON output")
    p.add_argument("--shoal", default=default_shoal(), help="the shoal CLI")
    args = p.parse_args(argv)
    if min(args.tasks, args.batch, args.inflight, args.every) < 1:
        p.error("--tasks, --batch, --inflight and --every must be at least 1")
    if args.every > args.tasks:
        p.error("--every must be at most --tasks (the slope needs two samples)")
    if args.keep_data is not None and args.keep_data.exists() and any(args.keep_data.iterdir()):
        p.error(f"--keep-data {args.keep_data} is not empty")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return finish(run_async(lambda children: bench(args, children)), args.out)


if __name__ == "__main__":
    sys.exit(main())
