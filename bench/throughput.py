"""End-to-end throughput and latency of no-op tasks.

What is measured: SDK `SubmitBatch` -> coordinator (durable acceptance) -> node (the built-in
`noop` executor) -> coordinator (durable outcome) -> the final event on a `Watch` stream.
The coordinator and the nodes run as separate `shoal` CLI processes on loopback, each with a
fresh data directory and the default `synchronous=FULL` (nodes with their resource guard off,
see bench/_common.py); the client is this process.

Two modes, for each cluster size in --nodes (default: 1 node, then 4 nodes):

- throughput: --tasks no-op tasks in batches of --batch, at most --inflight batches
  unfinished at once (a closed loop); tasks/s = completed / (first submit .. last final event).
- latency: an open loop offering a fixed rate (--rate tasks/s, or --rate-fraction of the
  throughput just measured: 10%, 50% and 80% by default) in small batches every --interval
  seconds for --latency-seconds; p50/p99 of submit-to-final-event, on the client's clock.

Every loop is bounded in count and in time (--deadline for the whole run); every child process
is stopped at exit, also on errors, Ctrl-C and SIGTERM. Figures are printed as a table, then
beside their targets (PASS/MISS), and written to bench/results/throughput.json (with a
per-second latency timeline per phase, CPU use of each process, and this client's own GC
pauses). With --profile, py-spy samples the coordinator, the first node and this client during
each phase and the table is followed by the hot spots; profiling slows the processes, so use
those runs for the shape, not the figures.

    .venv/bin/python bench/throughput.py                      # the default run (make bench)
    .venv/bin/python bench/throughput.py --nodes 1 --tasks 20000 --rate-fraction 0.1,0.5
    .venv/bin/python bench/throughput.py --profile            # also write py-spy profiles
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, TypeVar

import grpc
from _common import (
    RESULTS,
    BenchError,
    Children,
    Cluster,
    CpuMeter,
    Deadline,
    Figure,
    admin_token,
    default_shoal,
    figure,
    meta,
    ms,
    percentile,
    print_figures,
    run_async,
    start_cluster,
    wait_nodes,
    write_json,
)

from shoal import AsyncClient, noop
from shoal.errors import ShoalError
from shoal.specs import FINAL_STATES, is_final, state_name
from shoal.v1 import task_pb2

_SUCCEEDED = task_pb2.TASK_STATE_SUCCEEDED
_T = TypeVar("_T")


# -- tracking tasks from submit to final event ---------------------------------------------


@dataclass
class Phase:
    """What one measurement saw; times are time.perf_counter() seconds."""

    name: str
    record_from: float = 0.0  # batches submitted before this are warm-up: not in `latencies`
    latencies: list[float] = field(default_factory=list)  # submit -> final event, per task
    latency_at: list[float] = field(default_factory=list)  # the submit time of each of those
    acks: list[float] = field(default_factory=list)  # SubmitBatch call time, per batch
    submitted: int = 0
    completed: int = 0
    states: Counter[int] = field(default_factory=Counter)
    first_submit: float | None = None
    last_submit: float | None = None
    last_done: float | None = None
    timed_out: bool = False
    saturated: bool = False
    error: BaseException | None = None
    client_gc: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class Batch:
    phase: Phase
    remaining: int
    done: asyncio.Future[None]
    submitted_at: float = 0.0

    def finish_one(self, at: float, state: int) -> None:
        phase = self.phase
        phase.completed += 1
        phase.states[state] += 1
        if phase.last_done is None or at > phase.last_done:
            phase.last_done = at
        if self.submitted_at >= phase.record_from:
            phase.latencies.append(at - self.submitted_at)
            phase.latency_at.append(self.submitted_at)
        self.remaining -= 1
        if self.remaining == 0 and not self.done.done():
            self.done.set_result(None)


class Tracker:
    """Follows the live event stream and matches each final event to the batch of its task.

    A final event can arrive before SubmitBatch has returned the task's id; it is kept in
    `_early` until the batch registers its ids.
    """

    def __init__(self, client: AsyncClient, *, all_events: bool = False) -> None:
        self._client = client
        self._all_events = all_events
        self._pending: dict[str, Batch] = {}
        self._early: dict[str, tuple[float, int]] = {}
        self.events = 0

    async def run(self) -> None:
        pending, early = self._pending, self._early
        # Outcomes only, as a client waiting for results asks (every event: --all-events).
        states = () if self._all_events else FINAL_STATES
        async for event in self._client.watch(since=None, output=False, states=states):
            self.events += 1
            state = event.state
            if not is_final(state):
                continue
            at = time.perf_counter()
            batch = pending.pop(event.task_id, None)
            if batch is None:
                early[event.task_id] = (at, state)
            else:
                batch.finish_one(at, state)

    def register(self, batch: Batch, ids: Sequence[str]) -> None:
        for task_id in ids:
            seen = self._early.pop(task_id, None)
            if seen is None:
                self._pending[task_id] = batch
            else:
                batch.finish_one(*seen)

    def forget(self) -> None:
        """Drop what is still unmatched (after a phase that timed out)."""
        self._pending.clear()
        self._early.clear()


async def submit(
    client: AsyncClient, tracker: Tracker, batch: Batch, specs: Sequence[task_pb2.TaskSpec]
) -> None:
    phase = batch.phase
    batch.submitted_at = now = time.perf_counter()
    if phase.first_submit is None:
        phase.first_submit = now
    phase.last_submit = now
    phase.submitted += len(specs)
    try:
        ids = await client.submit_batch(specs)
    except Exception as err:
        phase.error = phase.error or err
        if not batch.done.done():
            batch.done.set_exception(err)
        return
    phase.acks.append(time.perf_counter() - batch.submitted_at)
    tracker.register(batch, ids)


async def guarded(coro: Coroutine[Any, Any, _T], checks: Callable[[], None]) -> _T:
    """Run a step; every half second run `checks`, which raise when a process or the watch died."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if task in done:
                return task.result()
            checks()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _new_batch(phase: Phase, size: int) -> Batch:
    return Batch(phase, size, asyncio.get_running_loop().create_future())


async def _gather_done(batches: Sequence[Batch], phase: Phase, timeout: float) -> None:
    """Wait for every batch to finish; on timeout mark the phase, never raise it."""
    try:
        async with asyncio.timeout(max(0.0, timeout)):
            for b in batches:
                with contextlib.suppress(Exception):
                    await asyncio.shield(b.done)
    except TimeoutError:
        phase.timed_out = True


async def warm_up(client: AsyncClient, tracker: Tracker, size: int, deadline: Deadline) -> None:
    """Make sure the watch is live (a probe task's final event arrives), then warm the path."""
    stop_at = time.monotonic() + deadline.left(20.0)
    probe = Phase("probe")
    while True:
        batch = _new_batch(probe, 1)
        await submit(client, tracker, batch, [noop()])
        if probe.error is not None:
            raise BenchError(f"probe submit failed: {probe.error}")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await asyncio.shield(batch.done)
            break
        if time.monotonic() > stop_at:
            raise BenchError("no final event for a probe task arrived on the watch stream")
    warm = Phase("warm-up")
    batch = _new_batch(warm, size)
    await submit(client, tracker, batch, [noop()] * size)
    await _gather_done([batch], warm, deadline.left(30.0))
    if warm.error is not None or warm.timed_out:
        raise BenchError(f"the warm-up batch did not complete: {warm.error or 'timed out'}")


async def run_throughput(
    client: AsyncClient, tracker: Tracker, args: argparse.Namespace, deadline: Deadline
) -> Phase:
    """Closed loop: at most `inflight` unfinished batches; bounded by count and time."""
    phase = Phase("throughput")
    specs = [noop()] * args.batch
    window = asyncio.Semaphore(args.inflight)
    batches: list[Batch] = []
    submits: set[asyncio.Task[None]] = set()
    stop_at = time.monotonic() + deadline.left(args.phase_timeout)
    total = args.tasks
    try:
        async with asyncio.timeout(max(0.0, stop_at - time.monotonic())):
            sent = 0
            while sent < total:
                await window.acquire()
                if phase.error is not None:
                    break
                size = min(args.batch, total - sent)
                batch = _new_batch(phase, size)
                batch.done.add_done_callback(lambda _: window.release())
                batches.append(batch)
                task = asyncio.create_task(submit(client, tracker, batch, specs[:size]))
                submits.add(task)
                task.add_done_callback(submits.discard)
                sent += size
    except TimeoutError:
        phase.timed_out = True
    await _gather_done(batches, phase, stop_at - time.monotonic())
    for task in list(submits):
        task.cancel()
    if phase.timed_out:
        tracker.forget()
    return phase


async def run_latency(
    client: AsyncClient,
    tracker: Tracker,
    rate: float,
    args: argparse.Namespace,
    deadline: Deadline,
) -> Phase:
    """Open loop: a batch every `interval` seconds at `rate` tasks/s, for a bounded time."""
    phase = Phase(f"latency@{rate:.0f}/s")
    per_batch = max(1, round(rate * args.interval))
    interval = per_batch / rate
    n_batches = max(1, math.ceil(args.latency_seconds / interval))
    specs = [noop()] * per_batch
    cap = max(args.batch, int(rate * args.max_backlog_seconds))  # unfinished tasks allowed
    batches: list[Batch] = []
    submits: set[asyncio.Task[None]] = set()
    start = time.perf_counter()
    phase.record_from = start + args.latency_warmup
    stop_at = time.monotonic() + deadline.left(args.latency_seconds + args.drain_timeout)
    for k in range(n_batches):
        if phase.error is not None or time.monotonic() >= stop_at:
            break
        delay = start + k * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if phase.submitted - phase.completed > cap:
            phase.saturated = True  # the offered rate is above what the cluster sustains
            break
        batch = _new_batch(phase, per_batch)
        batches.append(batch)
        task = asyncio.create_task(submit(client, tracker, batch, specs))
        submits.add(task)
        task.add_done_callback(submits.discard)
    drain = min(args.drain_timeout, stop_at - time.monotonic())
    await _gather_done(batches, phase, drain)
    for task in list(submits):
        task.cancel()
    if phase.timed_out:
        tracker.forget()
    return phase


# -- figures -------------------------------------------------------------------------------


def timeline(phase: Phase, step: float = 1.0) -> list[dict[str, Any]]:
    """Latency per `step` seconds of submit time: shows when a tail happened (e.g. a pause)."""
    if phase.first_submit is None or not phase.latencies:
        return []
    buckets: dict[int, list[float]] = {}
    for at, lat in zip(phase.latency_at, phase.latencies, strict=True):
        buckets.setdefault(int((at - phase.first_submit) / step), []).append(lat)
    return [
        {
            "t": round(k * step, 3),
            "n": len(v),
            "p50_ms": ms(percentile(v, 0.5)),
            "p99_ms": ms(percentile(v, 0.99)),
            "max_ms": ms(max(v)),
        }
        for k, v in sorted(buckets.items())
    ]


def summarise(phase: Phase, cpu: dict[str, float], offered: float | None) -> dict[str, Any]:
    span = None
    if phase.first_submit is not None and phase.last_done is not None:
        span = phase.last_done - phase.first_submit
    rate = phase.completed / span if span and span > 0 else None
    out: dict[str, Any] = {
        "mode": phase.name,
        "submitted": phase.submitted,
        "completed": phase.completed,
        "succeeded": phase.states.get(_SUCCEEDED, 0),
        "states": {state_name(s): n for s, n in sorted(phase.states.items())},
        "seconds": None if span is None else round(span, 3),
        "tasks_per_s": None if rate is None else round(rate, 1),
        "latency_samples": len(phase.latencies),
        "p50_ms": ms(percentile(phase.latencies, 0.50)),
        "p90_ms": ms(percentile(phase.latencies, 0.90)),
        "p99_ms": ms(percentile(phase.latencies, 0.99)),
        "max_ms": ms(max(phase.latencies) if phase.latencies else None),
        "ack_p50_ms": ms(percentile(phase.acks, 0.50)),
        "ack_p99_ms": ms(percentile(phase.acks, 0.99)),
        "cpu_percent": cpu,
        "client_gc": phase.client_gc,
        "timed_out": phase.timed_out,
        "saturated": phase.saturated,
        "error": None if phase.error is None else repr(phase.error),
        "timeline": timeline(phase),
    }
    if offered is not None:
        out["offered_per_s"] = round(offered, 1)
        if phase.first_submit is not None and phase.last_submit is not None:
            window = phase.last_submit - phase.first_submit
            n = len(phase.acks) or 1
            if window > 0 and n > 1:
                out["achieved_offer_per_s"] = round(phase.submitted * (n - 1) / n / window, 1)
    return out


class GcPauses:
    """This client's own garbage-collection pauses: they would delay what it measures."""

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append(time.perf_counter() - self._started)

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self)

    def summary(self) -> dict[str, Any]:
        return {
            "collections": len(self.pauses),
            "total_ms": ms(sum(self.pauses)),
            "max_ms": ms(max(self.pauses, default=0.0)),
        }


# -- profiling (optional) ------------------------------------------------------------------


class Profiler:
    """py-spy `record` on a few processes for the span of a phase; raw (collapsed) output."""

    def __init__(
        self, py_spy: str, targets: dict[str, int], out_dir: Path, tag: str, native: bool
    ) -> None:
        self.files: dict[str, Path] = {}
        self._procs: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = []
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, pid in targets.items():
            path = out_dir / f"profile-{tag}-{name}.txt"
            log = (out_dir / f"profile-{tag}-{name}.log").open("wb")
            argv = [py_spy, "record", "--pid", str(pid), "--rate", "100", "--threads"]
            argv += ["--format", "raw", "--output", str(path)]
            if native:
                argv.append("--native")  # C frames too: GC, GIL waits, protobuf, grpc core
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
            self._procs.append((name, proc, log))
            self.files[name] = path

    def stop(self) -> None:
        for _, proc, _ in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for _, proc, log in self._procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            log.close()
        self._procs.clear()


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_OWN_FILES = ("shoal/", "throughput.py")
_ENTRY_POINTS = frozenset(
    {
        "main (shoal/cli/__init__.py)",
        "main (shoal/cli/serving.py)",
        "coordinator (shoal/cli/serving.py)",
        "node (shoal/cli/serving.py)",
        "main (throughput.py)",
        "<module> (throughput.py)",
    }
)


def _frame_key(frame: str) -> str:
    """`func (path/file.py:123)` -> `func (path/file.py)`: lines merged per function."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    return f"{m.group('func')} ({m.group('file')})"


def summarise_profile(path: Path, top: int = 15) -> dict[str, Any]:
    """Where a process's time goes, from py-spy's raw output (recorded with --threads).

    Shares are of the samples of one thread. For the main (event loop) thread: `self` is the
    innermost function, `callbacks` the loop callback or task a sample ran in (the frame
    under asyncio's Handle._run), `inclusive` every Shoal function on the stack.
    """
    threads: Counter[str] = Counter()
    self_n: dict[str, Counter[str]] = {}
    callbacks: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    with contextlib.suppress(OSError), path.open(errors="replace") as f:
        for line in f:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = stack.split(";")
            thread = "?"
            if frames[0].startswith("thread ("):
                thread = frames[0].split(": ", 1)[-1]
                frames = frames[1:]
            if not frames:
                continue
            keys = [_frame_key(fr) for fr in frames]
            threads[thread] += count
            self_n.setdefault(thread, Counter())[keys[-1]] += count
            if thread != "MainThread":
                continue
            runs = [i for i, k in enumerate(keys) if k.startswith("Handle._run (")]
            if runs and runs[-1] + 1 < len(keys):
                callbacks[keys[runs[-1] + 1]] += count
            else:
                callbacks[f"(event loop) {keys[-1]}"] += count
            for key in set(keys):
                if any(own in key for own in _OWN_FILES):
                    inclusive[key] += count

    def share(c: Counter[str], total: int, n: int = top) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in c.most_common(n)] if total else []

    main_total = threads.get("MainThread", 0)
    return {
        "samples": sum(threads.values()),
        "threads": share(threads, sum(threads.values()), 10),
        "main_samples": main_total,
        "main_self": share(self_n.get("MainThread", Counter()), main_total),
        "main_callbacks": share(callbacks, main_total),
        "main_inclusive": share(
            Counter({k: v for k, v in inclusive.items() if k not in _ENTRY_POINTS}), main_total
        ),
        "other_threads_self": {
            t: share(self_n[t], n, 5) for t, n in threads.most_common() if t != "MainThread"
        },
    }


# -- the run -------------------------------------------------------------------------------


async def bench_cluster(
    n_nodes: int, args: argparse.Namespace, children: Children, deadline: Deadline, tag: str
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"shoal-bench-{n_nodes}n-"))
    result: dict[str, Any] = {"nodes": n_nodes, "slots_per_node": args.slots, "phases": []}
    cluster: Cluster | None = None
    try:
        cluster = await start_cluster(args.shoal, workdir, n_nodes, args.slots, children, deadline)
        token = admin_token(workdir / "data")
        client = AsyncClient(cluster.address, token=token)
        tracker = Tracker(client, all_events=args.all_events)
        watcher = asyncio.create_task(tracker.run(), name="bench-watch")
        try:
            await wait_nodes(client, n_nodes, children, deadline)

            def checks() -> None:
                children.check_alive()
                if watcher.done():
                    err = None if watcher.cancelled() else watcher.exception()
                    raise BenchError(f"the watch stream ended: {err!r}")

            await guarded(warm_up(client, tracker, args.batch, deadline), checks)
            deadline.check("warm-up")

            async def measure(
                label: str, step: Coroutine[Any, Any, Phase]
            ) -> tuple[Phase, dict[str, float], dict[str, Any]]:
                """Run a phase with CPU accounting, and py-spy on it with --profile."""
                profiler = None
                if args.profile and cluster is not None:
                    targets = {
                        "coordinator": cluster.coordinator.proc.pid,
                        "node0": cluster.nodes[0].proc.pid,
                        "client": os.getpid(),
                    }
                    name = f"{tag}-{n_nodes}n-{label}"
                    profiler = Profiler(
                        args.py_spy, targets, args.out.parent, name, args.profile_native
                    )
                    await asyncio.sleep(0.5)  # let py-spy attach
                meter = CpuMeter(cluster.pids()) if cluster is not None else None
                try:
                    with GcPauses() as pauses:
                        phase = await guarded(step, checks)
                finally:
                    if profiler is not None:
                        profiler.stop()
                cpu = meter.percent() if meter is not None else {}
                phase.client_gc = pauses.summary()
                profiles: dict[str, Any] = {}
                if profiler is not None:
                    profiles = {
                        who: {"file": str(path), **summarise_profile(path)}
                        for who, path in profiler.files.items()
                    }
                return phase, cpu, profiles

            phase, cpu, profiles = await measure(
                "throughput", run_throughput(client, tracker, args, deadline)
            )
            tp = summarise(phase, cpu, None)
            if profiles:
                tp["profiles"] = profiles
            result["phases"].append(tp)
            _print_progress(n_nodes, tp)
            if phase.error is not None:
                raise BenchError(f"throughput phase failed: {phase.error!r}")
            children.check_alive()

            rates: list[float] = list(args.rate or [])
            if not rates and tp["tasks_per_s"]:
                rates = [f * tp["tasks_per_s"] for f in args.rate_fraction]
            for i, rate in enumerate(rates):
                if deadline.left() < 2.0:
                    result["skipped"] = f"deadline: {len(rates) - i} latency phase(s) not run"
                    break
                lat, cpu, profiles = await measure(
                    f"latency{i}", run_latency(client, tracker, rate, args, deadline)
                )
                row = summarise(lat, cpu, rate)
                if not args.rate:
                    row["fraction_of_max"] = args.rate_fraction[i]
                if profiles:
                    row["profiles"] = profiles
                result["phases"].append(row)
                _print_progress(n_nodes, row)
                if lat.error is not None:
                    raise BenchError(f"latency phase failed: {lat.error!r}")
                children.check_alive()
            result["watch_events"] = tracker.events
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError, ShoalError):
                await watcher
            await client.close()
    finally:
        if cluster is not None:
            for child in [*cluster.nodes, cluster.coordinator]:
                children.stop(child)
        if args.keep:
            result["workdir"] = str(workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return result


def _print_progress(n_nodes: int, row: dict[str, Any]) -> None:
    flags = " (timed out)" if row["timed_out"] else ""
    flags += " (saturated)" if row["saturated"] else ""
    print(
        f"  {n_nodes} node(s) {row['mode']}: {row['completed']} tasks, "
        f"{row['tasks_per_s']} tasks/s, p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms{flags}",
        file=sys.stderr,
        flush=True,
    )


def _fmt(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def print_table(runs: Sequence[dict[str, Any]]) -> None:
    head = (
        f"{'nodes':>5}  {'mode':<16} {'offered/s':>9} {'tasks':>7} {'tasks/s':>8} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'ack p50':>8} {'ack p99':>8}  "
        f"{'cpu% coord/nodes/client':<24}"
    )
    print(head)
    print("-" * len(head))
    for run in runs:
        for row in run["phases"]:
            mode = row["mode"]
            if "fraction_of_max" in row:
                mode = f"latency@{row['fraction_of_max']:.0%}"
            cpu = row["cpu_percent"]
            note = " timed out" if row["timed_out"] else ""
            note += " saturated" if row["saturated"] else ""
            print(
                f"{run['nodes']:>5}  {mode:<16} {_fmt(row.get('offered_per_s'), '.0f'):>9} "
                f"{row['completed']:>7} {_fmt(row['tasks_per_s'], '.0f'):>8} "
                f"{_fmt(row['p50_ms'], '.1f'):>8} {_fmt(row['p99_ms'], '.1f'):>8} "
                f"{_fmt(row['ack_p50_ms'], '.1f'):>8} {_fmt(row['ack_p99_ms'], '.1f'):>8}  "
                f"{cpu['coordinator']:.0f}/{cpu['nodes']:.0f}/{cpu['client']:.0f}{note}"
            )


def print_profiles(runs: Sequence[dict[str, Any]], top: int = 12) -> None:
    def rows(title: str, items: Sequence[tuple[str, float]]) -> None:
        print(f"  {title}:")
        for fn, pct in items[:top]:
            print(f"    {pct:5.1f}%  {fn}")

    for run in runs:
        for phase in run["phases"]:
            for name, prof in phase.get("profiles", {}).items():
                print(f"\nprofile: {run['nodes']} node(s), {phase['mode']}, {name}: {prof['file']}")
                threads = ", ".join(f"{t} {p}%" for t, p in prof["threads"][:6])
                print(f"  samples by thread: {threads}")
                print(f"  main thread ({prof['main_samples']} samples), shares of its samples:")
                rows("self", prof["main_self"])
                rows("loop callback / task", prof["main_callbacks"])
                rows("inclusive (own code)", prof["main_inclusive"])


async def bench(args: argparse.Namespace, children: Children) -> dict[str, Any]:
    deadline = Deadline(args.deadline)
    report: dict[str, Any] = {"meta": meta(args), "runs": [], "complete": False}
    tag = datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        for n in args.nodes:
            deadline.check(f"the start of the {n}-node run")
            print(f"{n} node(s), {args.slots} slots each: starting", file=sys.stderr, flush=True)
            report["runs"].append(await bench_cluster(n, args, children, deadline, tag))
        report["complete"] = not any(
            row["timed_out"] or row["saturated"] or row["error"]
            for run in report["runs"]
            for row in run["phases"]
        )
    except BenchError as err:
        report["error"] = str(err)
    return report


def throughput_figures(runs: Sequence[dict[str, Any]]) -> list[Figure]:
    """The issue's figures: batched tasks/s for each cluster size, and p50/p99 at each latency
    rate (their targets hold at half the max rate)."""
    out: list[Figure] = []
    for run in runs:
        n = run["nodes"]
        for row in run["phases"]:
            note = ", ".join(k.replace("_", " ") for k in ("timed_out", "saturated") if row[k])
            if row["mode"] == "throughput":
                name = f"batched no-op tasks/s, {n} node(s)"
                out.append(figure(name, row["tasks_per_s"], "tasks/s", "batched", note))
                continue
            fraction = row.get("fraction_of_max")
            at = f"{fraction:.0%} of max" if fraction is not None else f"{row['offered_per_s']:g}/s"
            for q in ("p50", "p99"):
                name = f"{q} submit-to-result at {at}, {n} node(s)"
                out.append(figure(name, row[f"{q}_ms"], "ms", q if fraction == 0.5 else "", note))
    return out


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="No-op tasks end to end: tasks/s and submit-to-result latency.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--nodes", type=_ints, default=[1, 4], help="cluster sizes, comma-separated")
    p.add_argument("--slots", type=int, default=256, help="slots per node")
    p.add_argument("--tasks", type=int, default=50_000, help="tasks in the throughput phase")
    p.add_argument("--batch", type=int, default=1000, help="tasks per SubmitBatch (throughput)")
    p.add_argument("--inflight", type=int, default=4, help="unfinished batches at once")
    p.add_argument("--phase-timeout", type=float, default=40.0, help="throughput phase bound, s")
    p.add_argument(
        "--rate", type=_floats, default=None, help="latency phases at these tasks/s (overrides)"
    )
    p.add_argument(
        "--rate-fraction", type=_floats, default=[0.1, 0.5, 0.8], help="latency at fractions of max"
    )
    p.add_argument("--interval", type=float, default=0.01, help="seconds between latency batches")
    p.add_argument("--latency-seconds", type=float, default=8.0, help="offering time per rate")
    p.add_argument("--latency-warmup", type=float, default=1.0, help="seconds not recorded")
    p.add_argument("--drain-timeout", type=float, default=10.0, help="wait for stragglers, s")
    p.add_argument(
        "--max-backlog-seconds",
        type=float,
        default=2.0,
        help="stop offering once this many seconds of tasks are unfinished",
    )
    p.add_argument("--deadline", type=float, default=240.0, help="bound on the whole run, s")
    p.add_argument("--out", type=Path, default=RESULTS / "throughput.json", help="JSON output")
    p.add_argument(
        "--all-events",
        action="store_true",
        help="watch every event (default: outcomes only, as a client waiting for results)",
    )
    p.add_argument("--profile", action="store_true", help="py-spy the throughput phases")
    p.add_argument(
        "--profile-native", action="store_true", help="with --profile: C frames too (slower)"
    )
    p.add_argument("--keep", action="store_true", help="keep data dirs and logs")
    p.add_argument("--shoal", default=default_shoal(), help="the shoal CLI")
    p.add_argument(
        "--py-spy",
        default=str(Path(sys.executable).with_name("py-spy")),
        help="py-spy, for --profile",
    )
    args = p.parse_args(argv)
    if args.tasks < 1 or args.batch < 1 or args.inflight < 1 or args.slots < 1:
        p.error("--tasks, --batch, --inflight and --slots must be at least 1")
    if not args.nodes or min(args.nodes) < 1:
        p.error("--nodes needs sizes of at least 1")
    if args.rate is not None and min(args.rate, default=0) <= 0:
        p.error("--rate values must be positive")
    if args.interval <= 0 or args.latency_seconds <= 0:
        p.error("--interval and --latency-seconds must be positive")
    if not Path(args.shoal).exists() and shutil.which(args.shoal) is None:
        p.error(f"no shoal CLI at {args.shoal}")
    if args.profile and not Path(args.py_spy).exists() and shutil.which(args.py_spy) is None:
        p.error(f"--profile needs py-spy (pip install py-spy); not found at {args.py_spy}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = run_async(lambda children: bench(args, children))
    if report is None:
        return 130
    report["figures"] = throughput_figures(report["runs"])
    write_json(args.out, report)
    if report["runs"]:
        print()
        print_table(report["runs"])
        print("\ntargets:")
        print_figures(report["figures"])
    if args.profile:
        print_profiles(report["runs"])
    print(f"\nwritten: {args.out}")
    if "error" in report:
        print(f"error: {report['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
