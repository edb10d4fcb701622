"""What the benchmarks share: child processes, a Shoal cluster on loopback, CPU and memory
readings, the targets of issue 9 and the JSON files under bench/results/.

Every benchmark starts the coordinator and nodes as `shoal` CLI processes with fresh data
dirs and default settings (`synchronous=FULL`; but the nodes' resource guard is off: see
`child_env`), is bounded by a `Deadline`, and runs through `run_async`, which stops every
child on exit, errors, Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any, TypeVar

import grpc
import psutil

from shoal import AsyncClient
from shoal._server import collect_seldom
from shoal.config import ADMIN_TOKEN_FILE
from shoal.errors import ShoalError

RESULTS = Path(__file__).resolve().parent / "results"
MB = 1_000_000  # figures are in MB of 10^6 bytes: the targets' GB is 1,000 MB
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_LISTENING = re.compile(r"listening on (127\.0\.0\.1:\d+)")
_T = TypeVar("_T")


class BenchError(Exception):
    """The benchmark cannot go on (a process died, a step took too long, a call failed)."""


class Deadline:
    """The time left for the whole run, on the monotonic clock."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def left(self, cap: float | None = None) -> float:
        left = self.at - time.monotonic()
        return left if cap is None else min(left, cap)

    def check(self, what: str) -> None:
        if self.left() <= 0:
            raise BenchError(f"the overall deadline passed during {what}")


# -- child processes -----------------------------------------------------------------------


@dataclass(eq=False)
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]

    def tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""


class Children:
    """Every process this run started; `stop_all` ends each of them (SIGTERM, then SIGKILL)."""

    def __init__(self) -> None:
        self._children: list[Child] = []

    def spawn(self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str]) -> Child:
        log = log_path.open("wb")
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # a Ctrl-C in the terminal reaches only this process
            )
        except BaseException:
            log.close()
            raise
        child = Child(name, proc, log_path, log)
        self._children.append(child)
        return child

    def stop(self, child: Child, grace: float = 5.0, sig: int = signal.SIGTERM) -> None:
        proc = child.proc
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(grace)
        child.log.close()
        if child in self._children:
            self._children.remove(child)

    def stop_all(self) -> None:
        """Newest first: nodes before their coordinator."""
        for child in reversed(list(self._children)):
            self.stop(child)

    def check_alive(self) -> None:
        for child in self._children:
            code = child.proc.poll()
            if code is not None:
                raise BenchError(f"{child.name} exited with {code}:\n{child.tail()}")


def child_env(workdir: Path, settings: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment without any SHOAL_* setting or config file of the user: defaults only,
    plus `settings` (SHOAL_* variables a benchmark needs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env["SHOAL_CONFIG"] = str(workdir / "no-config.toml")
    env["SHOAL_COORDINATOR_SYNCHRONOUS"] = "FULL"
    env["NO_COLOR"] = "1"
    # A node's resource guard counts the coordinator and this client as the machine's own
    # foreground load: under a benchmark's load it throttles itself and takes no normal work.
    env["SHOAL_NODE_GUARD"] = "false"
    # The coordinator writes its admin token into its data dir; nodes and the client use it.
    env["SHOAL_NODE_TOKEN_FILE"] = str(workdir / "data" / ADMIN_TOKEN_FILE)
    env.update(settings or {})
    return env


@dataclass
class Cluster:
    coordinator: Child
    address: str
    nodes: list[Child]

    def pids(self) -> dict[str, list[int]]:
        """The processes a CpuMeter follows: the coordinator, the nodes and this client."""
        return {
            "coordinator": [self.coordinator.proc.pid],
            "nodes": [n.proc.pid for n in self.nodes],
            "client": [os.getpid()],
        }


async def wait_listening(
    child: Child, children: Children, deadline: Deadline, *, within: float = 20.0
) -> str:
    """The address the coordinator reports once it listens (after loading its store)."""
    stop_at = time.monotonic() + deadline.left(within)
    while time.monotonic() < stop_at:
        children.check_alive()
        with contextlib.suppress(OSError):
            match = _LISTENING.search(_ANSI.sub("", child.log_path.read_text(errors="replace")))
            if match:
                return match.group(1)
        await asyncio.sleep(0.05)
    raise BenchError(f"the coordinator did not report its address:\n{child.tail()}")


async def wait_nodes(
    client: AsyncClient,
    n: int,
    children: Children,
    deadline: Deadline,
    *,
    within: float = 30.0,
    every: float = 0.1,
) -> None:
    stop_at = time.monotonic() + deadline.left(within)
    seen = 0
    while time.monotonic() < stop_at:
        children.check_alive()
        with contextlib.suppress(ShoalError):
            seen = len(await client.nodes())
            if seen >= n:
                return
        await asyncio.sleep(every)
    raise BenchError(f"only {seen} of {n} nodes connected")


def start_coordinator(
    shoal: str,
    workdir: Path,
    children: Children,
    *,
    data: Path | None = None,
    listen: str = "127.0.0.1:0",
    settings: Mapping[str, str] | None = None,
    name: str = "coordinator",
) -> Child:
    """Spawn `shoal coordinator` (data dir: `data`, else <workdir>/data); its log is in workdir.
    `wait_listening` then gives its address."""
    return children.spawn(
        name,
        [shoal, "coordinator", "--listen", listen, "--data-dir", str(data or workdir / "data")],
        workdir / f"{name}.log",
        child_env(workdir, settings),
    )


async def start_cluster(
    shoal: str, workdir: Path, n_nodes: int, slots: int, children: Children, deadline: Deadline
) -> Cluster:
    env = child_env(workdir)
    coordinator = start_coordinator(shoal, workdir, children)
    address = await wait_listening(coordinator, children, deadline)
    nodes = [
        children.spawn(
            f"node{i}",
            [shoal, "node", "-c", address, "--slots", str(slots), "--node-id", f"bench-node-{i}"],
            workdir / f"node{i}.log",
            env,
        )
        for i in range(n_nodes)
    ]
    return Cluster(coordinator, address, nodes)


def admin_token(data: Path) -> str:
    """The admin token the coordinator wrote into its data dir."""
    return (data / ADMIN_TOKEN_FILE).read_text().strip()


# -- readings ------------------------------------------------------------------------------


class CpuMeter:
    """CPU time of groups of processes (summed per group) since it was made, in % of one core."""

    def __init__(self, groups: Mapping[str, Sequence[int]]) -> None:
        self._procs: dict[str, list[psutil.Process]] = {}
        for name, pids in groups.items():
            procs = []
            for pid in pids:
                with contextlib.suppress(psutil.Error):
                    procs.append(psutil.Process(pid))
            self._procs[name] = procs
        self._start = self._sample()
        self._t0 = time.monotonic()

    def _sample(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, procs in self._procs.items():
            total = 0.0
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system
            out[name] = total
        return out

    def percent(self) -> dict[str, float]:
        wall = max(time.monotonic() - self._t0, 1e-9)
        end = self._sample()
        return {k: round(100 * (end[k] - self._start[k]) / wall, 1) for k in end}


def rss_mb(pid: int) -> float:
    """Resident memory of a process, MB."""
    return round(psutil.Process(pid).memory_info().rss / MB, 1)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile; None when there is nothing to rank."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


# -- targets and figures -------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A bound from issue 9: `value <op> limit` passes."""

    op: str  # ">=", "<=" or "<"
    limit: float
    unit: str

    def passes(self, value: float) -> bool:
        if self.op == ">=":
            return value >= self.limit
        if self.op == "<=":
            return value <= self.limit
        return value < self.limit

    def __str__(self) -> str:
        return f"{self.op} {self.limit:,g} {self.unit}"


TARGETS = {
    "batched": Target(">=", 50_000, "tasks/s"),
    "p50": Target("<=", 1.5, "ms"),
    "p99": Target("<=", 5.0, "ms"),
    "unary": Target(">=", 2_000, "tasks/s"),
    "rt_p50": Target("<=", 1.5, "ms"),  # issue 24: one task at a time, submit to result
    "rt_p99": Target("<=", 4.0, "ms"),
    "mb_per_100k": Target("<=", 60, "MB"),
    "rss_1m": Target("<", 1_000, "MB"),
    "nodes_cpu": Target("<", 25, "% of a core"),
    "restart": Target("<", 10, "s"),
}


@dataclass
class Figure:
    """One figure a benchmark reports, with its target (if it has one) and verdict."""

    name: str
    value: float | None
    unit: str
    target: str = ""
    verdict: str = ""  # PASS, MISS, or "" without a target or a value
    note: str = ""


def figure(name: str, value: float | None, unit: str, target: str = "", note: str = "") -> Figure:
    """A figure checked against TARGETS[target] (none when `target` is empty)."""
    if not target:
        return Figure(name, value, unit, note=note)
    bound = TARGETS[target]
    verdict = "" if value is None else ("PASS" if bound.passes(value) else "MISS")
    return Figure(name, value, unit, str(bound), verdict, note)


def print_figures(figures: Sequence[Figure]) -> None:
    width = max((len(f.name) for f in figures), default=0)
    for f in figures:
        value = "-" if f.value is None else f"{f.value:,.6g} {f.unit}"
        target = f"  (target {f.target}) {f.verdict or '-'}" if f.target else ""
        note = f"  [{f.note}]" if f.note else ""
        print(f"  {f.name:<{width}}  {value:>18}{target}{note}")


# -- the run and its record ----------------------------------------------------------------


def _git(*argv: str) -> str:
    try:
        out = subprocess.run(
            ["git", *argv],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip()


def machine_speed() -> float:
    """ns per step of a plain Python loop, the best of three: this machine's speed varies by
    a third from hour to hour, and every figure with it; this tells runs apart."""
    best = math.inf
    for _ in range(3):
        start = time.perf_counter_ns()
        total = 0
        for i in range(1_000_000):
            total += i
        best = min(best, (time.perf_counter_ns() - start) / 1_000_000)
    return round(best, 1)


def meta(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "ns_per_loop_step": machine_speed(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "cpus": os.cpu_count(),
        "synchronous": "FULL",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }


def write_json(path: Path, report: Mapping[str, Any]) -> None:
    """Write a benchmark's record; Figures become plain objects."""

    def encode(obj: object) -> object:
        if isinstance(obj, Figure):
            return asdict(obj)
        raise TypeError(f"cannot encode {type(obj).__name__}")

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=encode) + "\n")


def finish(report: Mapping[str, Any] | None, out: Path) -> int:
    """A benchmark's end: its report written to `out` and its figures printed; the exit code
    (130 when interrupted, 1 when it failed)."""
    if report is None:
        return 130
    write_json(out, report)
    if "figures" in report:
        print_figures(report["figures"])
    print(f"written: {out}")
    if "error" in report:
        print(f"error: {report['error']}", file=sys.stderr)
        return 1
    return 0


def default_shoal() -> str:
    return str(Path(sys.executable).with_name("shoal"))


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM outside the event loop: unwind like Ctrl-C, so the children are stopped."""
    raise KeyboardInterrupt


async def _cancelled_by_sigterm(coro: Coroutine[Any, Any, _T]) -> _T:
    # SIGTERM cancels the run, so every `finally` (stopping processes, removing data) runs.
    main_task = asyncio.current_task()
    if main_task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    return await coro


def run_async(bench: Callable[[Children], Coroutine[Any, Any, _T]]) -> _T | None:
    """Run `bench(children)` on a new event loop; every child is stopped however it ends.
    None when interrupted (Ctrl-C, SIGTERM)."""
    children = Children()
    # This client holds every task it waits for: as in the coordinator, the collector's full
    # walks would otherwise pause it, and the latencies it measures, for 50-150 ms at a time.
    collect_seldom()
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        try:
            return asyncio.run(_cancelled_by_sigterm(bench(children)))
        finally:
            signal.signal(signal.SIGTERM, _interrupt)  # the event loop reset it on closing
            children.stop_all()
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; every child process was stopped", file=sys.stderr)
        return None
    finally:
        signal.signal(signal.SIGTERM, previous)
