"""Dispatch cost of the scheduler per task, with 1k, 100k and 1M tasks queued.

What is measured: `Scheduler.schedule()` alone, in-process, no gRPC and no store. The queue
holds a mix of placement classes (plain shell, python, a label, a selector, a CPU request),
tenants (with weights) and priorities; 8 nodes with 64 slots each take a batch per call.
Each cycle: `schedule()` (timed) fills the free slots; every dispatched task is released and
pushed again with a new seq, so the queue stays at its size. Push and release are timed
apart. The figure to read is schedule µs per dispatched task: flat from 1k to 1M means the
cost does not grow with the queue. The long-lived queue is moved out of the garbage
collector's sight (`gc.freeze()`) before timing, so collections of unrelated objects do not
rescan it; pass --no-freeze to see the cost with it in sight.

    .venv/bin/python bench/scheduler.py              # writes bench/results/scheduler.json
    .venv/bin/python bench/scheduler.py --sizes 1000,100000 --seconds 2
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from _common import meta

from shoal.coordinator.placement import (
    NodeSlots,
    Op,
    PlacementClass,
    Requirements,
    Resources,
    Scheduler,
    Selector,
)

NODES = 8
SLOTS = 64
TENANTS = {"alpha": 3.0, "beta": 1.0, "gamma": 1.0, "delta": 2.0}
PRIORITIES = (1, 2, 3, 3, 3, 4, 5)  # mostly NORMAL
CLASSES = (
    Requirements(PlacementClass("shell")),
    Requirements(PlacementClass("python")),
    Requirements(PlacementClass("shell", frozenset({("zone", "a")}))),
    Requirements(PlacementClass("shell", selectors=(Selector("zone", Op.IN, ("a", "b")),))),
    Requirements(PlacementClass("python", resources=Resources(cpu_milli=500))),
)


@dataclass(eq=False, slots=True)
class Task:
    seq: int
    priority: int
    tenant: str
    placement: Requirements
    queued: bool = True
    tag: float = 0.0


def make_nodes() -> list[NodeSlots]:
    return [
        NodeSlots(
            f"node-{i}",
            frozenset({"shell", "python"}),
            {"zone": "ab"[i % 2]},
            SLOTS,
            cpu_milli=64_000,
            memory_mb=262_144,
        )
        for i in range(NODES)
    ]


def run(size: int, seconds: float, freeze: bool, rng: random.Random) -> dict[str, Any]:
    """Fill a queue to `size`, then cycle dispatch / release / push for about `seconds`."""
    s = Scheduler(tenant_weights=TENANTS, rng=random.Random(1))
    for n in make_nodes():
        s.add_node(n)
    tenants = list(TENANTS)
    seq = 0
    fill_start = time.perf_counter()
    for _ in range(size):
        seq += 1
        s.queue.push(Task(seq, rng.choice(PRIORITIES), rng.choice(tenants), rng.choice(CLASSES)))
    fill = time.perf_counter() - fill_start
    gc.collect()
    if freeze:
        gc.freeze()
    dispatch_time = push_time = release_time = 0.0
    dispatched = cycles = 0
    per_call: list[float] = []
    deadline = time.perf_counter() + seconds
    try:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            batch = cast(list[tuple[Task, NodeSlots]], s.schedule())
            t1 = time.perf_counter()
            for task, node in batch:
                s.release(node, task)
            t2 = time.perf_counter()
            for task, _ in batch:
                seq += 1
                task.seq = seq
                s.queue.push(task)
            t3 = time.perf_counter()
            if not batch:
                raise RuntimeError("a cycle dispatched nothing: the bench's nodes are full")
            dispatch_time += t1 - t0
            release_time += t2 - t1
            push_time += t3 - t2
            dispatched += len(batch)
            cycles += 1
            per_call.append((t1 - t0) / len(batch) * 1e6)
    finally:
        if freeze:
            gc.unfreeze()
    assert len(s.queue) == size
    per_call.sort()
    return {
        "queued": size,
        "fill_us_per_task": fill / size * 1e6,
        "dispatched": dispatched,
        "batches": cycles,
        "batch_size": dispatched / cycles,
        "schedule_us_per_task": dispatch_time / dispatched * 1e6,
        "schedule_us_per_task_p50_batch": statistics.median(per_call),
        "schedule_us_per_task_p99_batch": per_call[int(len(per_call) * 0.99)],
        "release_us_per_task": release_time / dispatched * 1e6,
        "push_us_per_task": push_time / dispatched * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sizes", default="1000,100000,1000000", help="queue sizes, comma list")
    parser.add_argument("--seconds", type=float, default=6.0, help="timed cycles per size")
    parser.add_argument("--no-freeze", action="store_true", help="leave the queue to the gc")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    rng = random.Random(42)
    results = []
    print(
        f"{NODES} nodes x {SLOTS} slots, {len(CLASSES)} classes, {len(TENANTS)} tenants,"
        f" priorities {sorted(set(PRIORITIES))}, gc {'on' if args.no_freeze else 'frozen'}",
        flush=True,
    )
    header = (
        f"{'queued':>9} {'fill':>7} {'schedule':>9} {'p50':>7} {'p99':>7}"
        f" {'release':>8} {'push':>7} {'dispatched':>11}"
    )
    print(header + "\n" + " " * 10 + "µs/task per column; p50/p99 over batches of ~512")
    for size in sizes:
        r = run(size, args.seconds, not args.no_freeze, rng)
        results.append(r)
        print(
            f"{size:>9,} {r['fill_us_per_task']:>7.2f} {r['schedule_us_per_task']:>9.2f}"
            f" {r['schedule_us_per_task_p50_batch']:>7.2f}"
            f" {r['schedule_us_per_task_p99_batch']:>7.2f} {r['release_us_per_task']:>8.2f}"
            f" {r['push_us_per_task']:>7.2f} {r['dispatched']:>11,}",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "scheduler.json"
    path.write_text(
        json.dumps(
            {
                "meta": meta(args),
                "python": sys.version.split()[0],
                "platform": platform.platform(),
                "nodes": NODES,
                "slots_per_node": SLOTS,
                "classes": len(CLASSES),
                "tenants": TENANTS,
                "gc_frozen": not args.no_freeze,
                "seconds_per_size": args.seconds,
                "results": results,
            },
            indent=2,
        )
    )
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
