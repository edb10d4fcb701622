"""Coordinator restart time with many queued tasks in its store (the target: 1M in < 10 s).

What is measured: a coordinator whose store holds queued no-op tasks (no node ever connected)
is stopped with SIGTERM and started again on the same data dir and port. From the spawn of
the new process: the time until gRPC health answers SERVING, and until a `List` and a `Get` of
a stored task both work; then the new process's RSS. The store is the one bench/memory.py
--keep-data left (--data-dir; it is left in place), or one this run fills with memory.py's
code (--tasks, default 1,000,000, in a temporary dir).

    .venv/bin/python bench/recovery.py --data-dir /tmp/store   # after memory.py --keep-data
    .venv/bin/python bench/recovery.py --tasks 50000           # fills a store of its own first
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from _common import (
    RESULTS,
    BenchError,
    Child,
    Children,
    Deadline,
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
from grpc_health.v1 import health_pb2, health_pb2_grpc
from memory import fill, queue_cap

from shoal import AsyncClient
from shoal.errors import ShoalError
from shoal.specs import state_name

# Try to connect again every 10-50 ms, not after grpc's default backoff of 1 s and more.
_PROBE_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 10),
    ("grpc.min_reconnect_backoff_ms", 10),
    ("grpc.max_reconnect_backoff_ms", 50),
]


def queued_in_store(data: Path) -> int:
    """Unfinished tasks in a stopped coordinator's store, read from its SQLite file."""
    uri = f"file:{data / 'shoal.db'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        (n,) = conn.execute("SELECT count(*) FROM tasks WHERE final_seq IS NULL").fetchone()
    return int(n)


async def until_serving(address: str, children: Children, deadline: Deadline) -> None:
    """Wait until gRPC health answers SERVING for the whole server."""
    async with grpc.aio.insecure_channel(address, options=_PROBE_OPTIONS) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while deadline.left() > 0:
            children.check_alive()
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await health.Check(
                    health_pb2.HealthCheckRequest(), timeout=0.5, wait_for_ready=True
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.01)
    raise BenchError("the restarted coordinator did not answer SERVING")


async def until_readable(
    address: str, token: str, task_id: str, children: Children, deadline: Deadline
) -> str:
    """Wait until `List` and `Get(task_id)` both work; returns the task's state."""
    async with AsyncClient(address, token=token, retry_for=timedelta(0)) as client:
        while deadline.left() > 0:
            children.check_alive()
            with contextlib.suppress(ShoalError):
                await client.list(limit=1)
                return state_name((await client.get(task_id)).state)
            await asyncio.sleep(0.01)
    raise BenchError("List and Get did not work on the restarted coordinator")


async def bench(args: argparse.Namespace, children: Children) -> dict[str, Any]:
    deadline = Deadline(args.deadline)
    report: dict[str, Any] = {"meta": meta(args)}
    workdir = Path(tempfile.mkdtemp(prefix="shoal-bench-recovery-"))
    data = args.data_dir or workdir / "data"
    coordinator: Child | None = None
    try:
        settings = queue_cap(args.tasks)
        spawned = time.monotonic()
        coordinator = start_coordinator(args.shoal, workdir, children, data=data, settings=settings)
        address = await wait_listening(coordinator, children, deadline, within=deadline.left())
        report["first_start_s"] = round(time.monotonic() - spawned, 3)
        token = admin_token(data)
        async with AsyncClient(address, token=token, retry_for=timedelta(seconds=5)) as client:
            if args.data_dir is None:
                print(f"filling a store with {args.tasks:,} tasks", file=sys.stderr, flush=True)
                await fill(
                    client, args.tasks, batch=2000, inflight=4, every=args.tasks, deadline=deadline
                )
            newest = await client.list(limit=1)
        if not newest:
            raise BenchError(f"the store at {data} holds no task")

        stopping = time.monotonic()
        children.stop(coordinator, grace=args.stop_grace)
        report["stop_s"] = round(time.monotonic() - stopping, 3)
        report["stop_exit_code"] = coordinator_exit = coordinator.proc.returncode
        report["queued"] = queued = queued_in_store(data)
        print(f"restarting with {queued:,} tasks queued", file=sys.stderr, flush=True)

        spawned = time.monotonic()
        coordinator = start_coordinator(
            args.shoal,
            workdir,
            children,
            data=data,
            listen=address,
            settings=settings,
            name="coordinator-restarted",
        )
        await until_serving(address, children, deadline)
        report["health_s"] = health_s = round(time.monotonic() - spawned, 3)
        report["task_state"] = await until_readable(
            address, token, newest[0].id, children, deadline
        )
        report["list_get_s"] = ready_s = round(time.monotonic() - spawned, 3)
        report["rss_mb"] = rss_mb(coordinator.proc.pid)
        note = "" if queued >= 1_000_000 else "the target is for 1M tasks"
        killed = "" if coordinator_exit == 0 else f"exit code {coordinator_exit}"
        report["figures"] = [
            figure(f"restart to health SERVING, {queued:,} queued", health_s, "s", "restart", note),
            figure(f"restart to List+Get, {queued:,} queued", ready_s, "s", "restart", note),
            figure(f"coordinator RSS after restart, {queued:,} queued", report["rss_mb"], "MB"),
            figure("stop before the restart (SIGTERM to exit)", report["stop_s"], "s", note=killed),
            figure("first start, until it listens", report["first_start_s"], "s"),
        ]
    except BenchError as err:
        report["error"] = str(err)
    finally:
        if coordinator is not None:
            children.stop(coordinator, grace=args.stop_grace)
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Coordinator restart time with many queued tasks in its store.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data-dir", type=Path, default=None, help="a store memory.py kept")
    p.add_argument("--tasks", type=int, default=1_000_000, help="tasks, without --data-dir")
    p.add_argument("--stop-grace", type=float, default=30.0, help="SIGTERM to SIGKILL, s")
    p.add_argument("--deadline", type=float, default=600.0, help="bound on the whole run, s")
    p.add_argument("--out", type=Path, default=RESULTS / "recovery.json", help="JSON output")
    p.add_argument("--shoal", default=default_shoal(), help="the shoal CLI")
    args = p.parse_args(argv)
    if args.data_dir is not None and not (args.data_dir / "shoal.db").is_file():
        p.error(f"no coordinator store in {args.data_dir}")
    if args.tasks < 1:
        p.error("--tasks must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return finish(run_async(lambda children: bench(args, children)), args.out)


if __name__ == "__main__":
    sys.exit(main())
