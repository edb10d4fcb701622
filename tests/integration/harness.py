"""What integration tests share: deadline-bound waits, the in-process mesh, CLI processes.

Nothing here sleeps for a fixed time: every wait is on an event, a process, or a condition
polled by `eventually` against a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import os
import random
import shlex
import signal
import socket
import sys
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar, overload

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shoal import AsyncClient
from shoal.coordinator.server import CoordinatorServer
from shoal.node.agent import NodeAgent

__all__ = [
    "BIN",
    "STARTUP",
    "CliProcess",
    "CliProcesses",
    "Completed",
    "Mesh",
    "MeshFactory",
    "collect",
    "eventually",
    "free_port",
    "gate_script",
    "health_status",
    "process_gone",
    "run_tool",
    "wait_serving",
]

_T = TypeVar("_T")

BIN = Path(sys.executable).parent
"""The venv's scripts: `shoal`, `grpcurl`."""

STARTUP = 15.0
"""Deadline in seconds for a server or process to come up."""


# -- waiting -------------------------------------------------------------------------------


@overload
async def eventually(
    check: Callable[[], Awaitable[_T]],
    *,
    timeout: float = ...,
    interval: float = ...,
    retry_on: tuple[type[BaseException], ...] = ...,
) -> _T: ...


@overload
async def eventually(
    check: Callable[[], _T],
    *,
    timeout: float = ...,
    interval: float = ...,
    retry_on: tuple[type[BaseException], ...] = ...,
) -> _T: ...


async def eventually(
    check: Callable[[], object],
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    retry_on: tuple[type[BaseException], ...] = (AssertionError,),
) -> object:
    """Call `check` (sync or async) until it returns something other than False without
    raising one of `retry_on` (a condition, `lambda: x == y`, waits until it holds).

    Returns what `check` returned; past `timeout` seconds, raises AssertionError chained to
    the last failure.
    """
    deadline = time.monotonic() + timeout
    while True:
        failure: BaseException | None = None
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result is not False:
                return result
        except retry_on as err:
            failure = err
        if time.monotonic() >= deadline:
            why = repr(failure) if failure is not None else "it returned False"
            raise AssertionError(f"not true within {timeout:g} s: {why}") from failure
        await asyncio.sleep(interval)


async def collect(events: AsyncGenerator[_T, None], until: Callable[[_T], bool]) -> list[_T]:
    """Items of `events` up to and including the first that `until` accepts; then closes it.

    Closing matters: a watch left suspended is finalized later, on another test's loop.
    """
    out: list[_T] = []
    async with contextlib.aclosing(events):
        async for item in events:
            out.append(item)
            if until(item):
                break
    return out


_PORTS_PER_WORKER = 4000
_FIRST_PORT = 12_000  # below the kernel's ephemeral ports (32768-60999), where port 0 lands
_WORKERS = (32_768 - _FIRST_PORT) // _PORTS_PER_WORKER
_worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
_ports = itertools.count(random.randrange(_PORTS_PER_WORKER))


def free_port() -> int:
    """A loopback TCP port nothing listens on right now (for processes that need one fixed),
    from a range of this test worker's own: between its pick and its use, no other worker (nor
    a server bound to port 0, which the kernel gives ephemeral ports) can take it."""
    base = _FIRST_PORT + (int(_worker) % _WORKERS if _worker.isdigit() else 0) * _PORTS_PER_WORKER
    for _ in range(_PORTS_PER_WORKER):
        port = base + next(_ports) % _PORTS_PER_WORKER
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use, or still in TIME_WAIT
            return port
    raise RuntimeError(f"no free port from {base} to {base + _PORTS_PER_WORKER - 1}")


def gate_script(gate: Path, then: str = "", *, limit: float = 60.0) -> str:
    """A /bin/sh script that blocks until `gate` exists, then runs `then`.

    It gives up (exit 99) after `limit` seconds, so a failed test never leaves it behind.
    """
    path = shlex.quote(str(gate))
    polls = int(limit / 0.02)
    return (
        f"n=0; until [ -e {path} ]; do n=$((n+1)); [ $n -gt {polls} ] && exit 99; "
        f"sleep 0.02; done; {then}"
    )


def process_gone(pid: int) -> None:
    """Assert that `pid` no longer runs (a zombie waiting for its reaper counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return
    try:
        status = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return
    assert status == psutil.STATUS_ZOMBIE, f"process {pid} still runs ({status})"


async def health_status(address: str, service: str = "") -> int:
    """grpc.health.v1.Health/Check of `address` over a fresh channel."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
        return int(response.status)


async def wait_serving(address: str, *, timeout: float = STARTUP) -> None:
    """Return once `address` answers its health check with SERVING."""

    async def serving() -> None:
        assert await health_status(address) == health_pb2.HealthCheckResponse.SERVING

    await eventually(
        serving, timeout=timeout, interval=0.05, retry_on=(AssertionError, grpc.RpcError)
    )


# -- the in-process mesh -------------------------------------------------------------------


@dataclass
class Mesh:
    """A coordinator and one node in this process, and a client of the coordinator."""

    coordinator: CoordinatorServer
    node: NodeAgent
    client: AsyncClient
    data_dir: Path
    token: str  # the coordinator's admin token
    start_node: Callable[..., Awaitable[NodeAgent]]  # another connected node (NodeSettings)

    @property
    def address(self) -> str:
        return self.coordinator.address

    @property
    def node_address(self) -> str:
        return f"127.0.0.1:{self.node.port}"


MeshFactory = Callable[..., Awaitable[Mesh]]
"""`await make(slots=N, **node_settings)`: a new connected mesh, shut down in teardown."""


# -- processes -----------------------------------------------------------------------------


@dataclass
class CliProcess:
    """A `shoal ...` process; its output goes to `log` unless it was started with pipes."""

    name: str
    argv: list[str]
    proc: asyncio.subprocess.Process
    log: Path | None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    def output(self) -> str:
        """What it wrote so far (stdout and stderr interleaved), for failure messages."""
        return self.log.read_text(errors="replace") if self.log is not None else ""

    async def kill(self) -> int:
        """SIGKILL, and reap it."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
        return await self.proc.wait()

    async def stop(self, grace: float = 10.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited after `grace` seconds; reaps it."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(self.proc.wait(), grace)
        return await self.kill()


@dataclass
class CliProcesses:
    """Starts `shoal` CLI processes and stops (or kills) every one of them in `aclose`."""

    tmp_path: Path
    started: list[CliProcess] = field(default_factory=list)

    async def start(
        self,
        *args: str,
        name: str = "shoal",
        pipe: bool = False,
        log_name: str = "",
        prefix: Sequence[str] = (),
    ) -> CliProcess:
        """Run `shoal ARGS...` (after `prefix`, such as `ip netns exec NS`); with `pipe`,
        stdout and stderr are pipes to read from."""
        argv = [*prefix, str(BIN / "shoal"), *args]
        log: Path | None = None
        out: int | IO[bytes]
        err: int
        if pipe:
            out, err = asyncio.subprocess.PIPE, asyncio.subprocess.PIPE
        else:
            log = self.tmp_path / (log_name or f"{name}-{len(self.started)}.log")
            out, err = log.open("ab"), asyncio.subprocess.STDOUT
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=err
            )
        finally:
            if not isinstance(out, int):
                out.close()  # the child holds its own descriptor
        cli = CliProcess(name, argv, proc, log)
        self.started.append(cli)
        return cli

    async def coordinator(
        self, port: int, data_dir: Path, *, name: str = "coordinator"
    ) -> CliProcess:
        """A `shoal coordinator` process, returned once it answers health checks."""
        cli = await self.start(
            "coordinator",
            "--listen",
            f"127.0.0.1:{port}",
            "--data-dir",
            str(data_dir),
            name=name,
            log_name=f"{name}.log",  # restarts append to the same log
        )
        try:
            await wait_serving(f"127.0.0.1:{port}")
        except AssertionError as err:
            raise AssertionError(f"{name} did not come up:\n{cli.output()}") from err
        return cli

    async def node(self, coordinator: str, *, node_id: str, slots: int) -> CliProcess:
        """A `shoal node` process; see `client.nodes()` for when its session is up."""
        return await self.start(
            "node", "-c", coordinator, "--node-id", node_id, "--slots", str(slots), name=node_id
        )

    def logs(self) -> str:
        """Every process's output, for failure messages."""
        return "\n".join(
            f"--- {c.name} ({' '.join(c.argv[1:])})\n{c.output()}" for c in self.started
        )

    async def aclose(self) -> None:
        """Stop every process, newest first: nodes hand their work back to a live coordinator."""
        for cli in reversed(self.started):
            await cli.stop()


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str


async def run_tool(argv: Sequence[str], *, timeout: float = 20.0) -> Completed:
    """Run a short-lived command without blocking the event loop (in-process servers use it)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Completed(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))
