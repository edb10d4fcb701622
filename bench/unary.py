"""Unary submits: one no-op task per `Tasks.Submit` call, many calls in flight.

What is measured: --concurrency callers (default 128) each send `Submit` with one task and
send the next as soon as the last is answered, for --seconds; the calls carry no request id,
as grpcurl's do not. One coordinator (durable store, synchronous=FULL) and one node (--slots)
run as `shoal` CLI processes on loopback. Figures: tasks/s accepted (answered calls over the
submitting window) and completed (final events on a `Watch` stream, from the first submit to
the last final event; the run waits up to --drain-timeout for them), both against the target
of 2,000 tasks/s; p50/p99 of the Submit call; CPU of the coordinator, the node and this
client (a client near 100% means it, not the coordinator, set the pace).

    .venv/bin/python bench/unary.py                    # writes bench/results/unary.json
    .venv/bin/python bench/unary.py --seconds 5 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
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

from shoal import AsyncClient, noop
from shoal.errors import ShoalError
from shoal.specs import is_final
from shoal.v1 import tasks_pb2, tasks_pb2_grpc


@dataclass
class Tally:
    """What the callers and the watch saw; times are time.perf_counter() seconds."""

    accepted: int = 0
    finals: int = 0
    calls: list[float] = field(default_factory=list)  # the duration of each answered call
    errors: Counter[str] = field(default_factory=Counter)
    first_submit: float | None = None
    last_answer: float | None = None
    last_final: float | None = None
    want: int = 0  # `reached` is set once `finals` is at least this
    reached: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_finals(self, n: int) -> None:
        self.want = n
        self.reached.clear()
        if self.finals < n:
            await self.reached.wait()


async def follow(client: AsyncClient, tally: Tally) -> None:
    """Count final events: every task of this coordinator is one of the benchmark's."""
    async for event in client.watch(since=None, output=False):
        if is_final(event.state):
            tally.finals += 1
            tally.last_final = time.perf_counter()
            if tally.finals >= tally.want:
                tally.reached.set()


async def caller(
    stub: Any, metadata: tuple[tuple[str, str], ...], tally: Tally, until: float
) -> None:
    request = tasks_pb2.SubmitRequest(spec=noop())
    while (started := time.perf_counter()) < until:
        if tally.first_submit is None:
            tally.first_submit = started
        try:
            await stub.Submit(request, timeout=30.0, metadata=metadata)
        except grpc.aio.AioRpcError as err:
            tally.errors[err.code().name] += 1
            await asyncio.sleep(0.1)  # do not spin on a failing coordinator
            continue
        tally.last_answer = now = time.perf_counter()
        tally.accepted += 1
        tally.calls.append(now - started)


async def supervise(
    work: asyncio.Future[Any], children: Children, watch: asyncio.Task[None]
) -> None:
    """Wait for `work`, checking every half second that the processes and the watch live."""
    try:
        while not work.done():
            await asyncio.wait({work}, timeout=0.5)
            children.check_alive()
            if watch.done():
                raise BenchError(f"the watch stream ended: {watch.exception()!r}")
        work.result()
    except grpc.aio.AioRpcError as err:
        raise BenchError(f"a call failed: {err.code().name} {err.details()}") from None
    finally:
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work


async def probe(stub: Any, metadata: tuple[tuple[str, str], ...], tally: Tally) -> None:
    """Submit a task a second until a final event arrives: the watch is live."""
    request = tasks_pb2.SubmitRequest(spec=noop())
    while tally.finals == 0:
        await stub.Submit(request, timeout=10.0, metadata=metadata)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await tally.wait_finals(1)


async def bench(args: argparse.Namespace, children: Children) -> dict[str, Any]:
    deadline = Deadline(args.deadline)
    report: dict[str, Any] = {"meta": meta(args)}
    workdir = Path(tempfile.mkdtemp(prefix="shoal-bench-unary-"))
    cluster: Cluster | None = None
    try:
        cluster = await start_cluster(args.shoal, workdir, 1, args.slots, children, deadline)
        token = admin_token(workdir / "data")
        metadata = (("authorization", f"Bearer {token}"),)
        tally = Tally()
        async with (
            AsyncClient(cluster.address, token=token) as client,
            grpc.aio.insecure_channel(cluster.address) as channel,
        ):
            stub = tasks_pb2_grpc.TasksStub(channel)
            watch = asyncio.create_task(follow(client, tally))
            try:
                await wait_nodes(client, 1, children, deadline)
                await supervise(
                    asyncio.ensure_future(probe(stub, metadata, tally)), children, watch
                )
                base = tally.finals
                meter = CpuMeter(cluster.pids())
                until = time.perf_counter() + min(args.seconds, deadline.left())
                callers = [caller(stub, metadata, tally, until) for _ in range(args.concurrency)]
                await supervise(asyncio.gather(*callers), children, watch)
                cpu = meter.percent()

                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(deadline.left(args.drain_timeout)):
                        everything = tally.wait_finals(base + tally.accepted)
                        await supervise(asyncio.ensure_future(everything), children, watch)
            finally:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError, ShoalError):
                    await watch
        completed = tally.finals - base
        start = tally.first_submit or 0.0
        accepted_s = (tally.last_answer or start) - start
        completed_s = (tally.last_final or start) - start
        report.update(
            accepted=tally.accepted,
            completed=completed,
            errors=dict(tally.errors),
            cpu_percent=cpu,
            accepted_per_s=round(tally.accepted / accepted_s, 1) if accepted_s > 0 else None,
            completed_per_s=round(completed / completed_s, 1) if completed_s > 0 else None,
        )
        note = "" if completed == tally.accepted else f"{tally.accepted - completed} not completed"
        if tally.errors:
            note = f"{sum(tally.errors.values())} calls failed; {note}".rstrip("; ")
        calls, flight = tally.calls, f"{args.concurrency} calls in flight"
        report["figures"] = [
            figure(
                f"unary tasks/s accepted, {flight}",
                report["accepted_per_s"],
                "tasks/s",
                "unary",
                note,
            ),
            figure(
                f"unary tasks/s completed, {flight}",
                report["completed_per_s"],
                "tasks/s",
                "unary",
                note,
            ),
            figure("Submit call p50", ms(percentile(calls, 0.5)), "ms"),
            figure("Submit call p99", ms(percentile(calls, 0.99)), "ms"),
        ]
        for who, pct in cpu.items():
            report["figures"].append(figure(f"CPU of the {who}, submitting", pct, "% of a core"))
    except BenchError as err:
        report["error"] = str(err)
    finally:
        if cluster is not None:
            for child in [*cluster.nodes, cluster.coordinator]:
                children.stop(child)
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="One task per unary Submit call, many calls in flight: tasks/s.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--concurrency", type=int, default=128, help="calls in flight")
    p.add_argument("--seconds", type=float, default=20.0, help="how long to submit")
    p.add_argument("--slots", type=int, default=256, help="slots of the node")
    p.add_argument("--drain-timeout", type=float, default=20.0, help="wait for completions, s")
    p.add_argument("--deadline", type=float, default=120.0, help="bound on the whole run, s")
    p.add_argument("--out", type=Path, default=RESULTS / "unary.json", help="JSON output")
    p.add_argument("--shoal", default=default_shoal(), help="the shoal CLI")
    args = p.parse_args(argv)
    if args.concurrency < 1 or args.slots < 1 or args.seconds <= 0:
        p.error("--concurrency and --slots must be at least 1, --seconds positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return finish(run_async(lambda children: bench(args, children)), args.out)


if __name__ == "__main__":
    sys.exit(main())
