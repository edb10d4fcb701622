"""Functions the integration tests' nodes import (`--import tests.integration.functions_module`)."""

from __future__ import annotations

import _thread
import asyncio
import fcntl
import io
import logging
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from pydantic import BaseModel, field_serializer, field_validator

import shoal

_log = logging.getLogger("functions_module")


@dataclass
class Point:
    x: float
    y: float


@shoal.task
def add(a: int, b: int) -> int:
    return a + b


@shoal.task
def square(x: int) -> int:
    return x * x


@shoal.task
async def greet(name: str, *, punctuation: str = "!") -> str:
    await asyncio.sleep(0)
    print(f"greeting {name}")
    _log.warning("logged for %s", name)
    return f"hello {name}{punctuation}"


@shoal.task
def midpoint(a: Point, b: Point) -> Point:
    return Point((a.x + b.x) / 2, (a.y + b.y) / 2)


@shoal.task
def total(values: list[int]) -> int:
    return sum(values)


class Refused(ValueError):
    """Raised on purpose."""


@shoal.task
def fail(why: str) -> None:
    raise Refused(why)


@shoal.task
async def wait_async(seconds: float, marker: str = "") -> str:
    """Sleeps; writes "started" to `marker` (a file), then "cancelled" when CancelledError
    arrives."""
    if marker:
        Path(marker).write_text("started")  # noqa: ASYNC240  (a test's marker)
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        print("stopping")
        if marker:
            Path(marker).write_text("cancelled")  # noqa: ASYNC240  (a test's marker)
        raise
    return "woke"


@shoal.task
async def started_then_wait(seconds: float) -> str:
    """Says `started` (flushed, so it streams), then sleeps."""
    print("started", flush=True)
    await asyncio.sleep(seconds)
    return "woke"


class Gate:
    """A file a test holds locked while calls that `wait_at` it must wait: they pass once the
    test opens it (releases its lock), at once when it is open, and when the test dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self.shut()

    def shut(self) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT)
            fcntl.flock(self._fd, fcntl.LOCK_EX)

    def open(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the lock goes with it
            self._fd = None

    def __str__(self) -> str:
        return str(self.path)


STUCK_GATE = "FUNCTIONS_STUCK_GATE"
"""The variable naming the Gate at which importing tests.integration.functions_stuck waits."""


def wait_at(gate: str) -> None:
    """Wait until the Gate at `gate` is open."""
    fd = os.open(gate, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)


@shoal.task
def wait_sync(gate: str) -> str:
    """A sync call that blocks (no CancelledError can reach it) until the Gate `gate` opens."""
    wait_at(gate)
    return "woke"


@shoal.task
def pid_after(gate: str) -> int:
    """Writes its worker's pid to `gate` + ".pid", then waits at the Gate `gate`."""
    Path(gate + ".pid").write_text(str(os.getpid()))
    wait_at(gate)
    return os.getpid()


@shoal.task(retries=2)
def flaky(counter: str) -> int:
    """Fails until it has been called three times (counting in the file `counter`)."""
    path = Path(counter)
    n = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(n))
    if n < 3:
        raise RuntimeError(f"attempt {n} fails")
    return n


@shoal.task(timeout=timedelta(seconds=1))
async def too_slow() -> str:
    await asyncio.sleep(60)
    return "never"


@shoal.task
async def with_progress(steps: int, gate: str = "") -> int:
    for i in range(steps):
        shoal.progress((i + 1) / steps, f"{i + 1} of {steps}")
        await asyncio.sleep(0.05)
    if gate:
        await asyncio.to_thread(wait_at, gate)
    return steps


@shoal.task
def noop() -> None:
    return None


@shoal.task
def record(path: str, x: int) -> int:
    """Note `x` in the file at `path`; a negative `x` ends the worker before it answers."""
    with open(path, "a") as f:
        f.write(f"{x}\n")
    if x < 0:
        os._exit(7)
    return x


_KEPT = -1


def _late(gate: str, began: threading.Event | None = None) -> None:
    """A leftover: prints once the Gate at `gate` opens, amid the calls after its own."""
    if began is not None:
        began.set()
    wait_at(gate)
    print("late")


_LATE = (
    "import fcntl, os, sys; fcntl.flock(os.open(sys.argv[1], os.O_RDONLY), fcntl.LOCK_SH);"
    " print('late')"
)
"""A child's `_late`: its program, given the Gate's path."""


@shoal.task
def leaves(what: str, gate: str) -> int:
    """Returns, leaving something behind that would run beside the calls after it (and print
    once the Gate at `gate` opens)."""
    late = [sys.executable, "-c", _LATE, gate]
    if what == "thread":
        threading.Thread(target=_late, args=(gate,), daemon=True).start()
    elif what == "raw thread":  # seen by Python once it runs
        began = threading.Event()
        _thread.start_new_thread(_late, (gate, began))
        began.wait(10)
    elif what == "child":
        subprocess.Popen(late)
    elif what == "grandchild":  # its parent gone at once: a daemon
        subprocess.run([sys.executable, "-c", f"import subprocess; subprocess.Popen({late!r})"])
    elif what == "fd 1":  # replaced by a file, the pipe kept open by a copy
        global _KEPT
        _KEPT = os.dup(1)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    elif what == "stdout":
        sys.stdout = io.StringIO()
    elif what == "timer":
        signal.signal(signal.SIGALRM, lambda *_: print("late"))
        signal.setitimer(signal.ITIMER_REAL, 0.3, 0.3)
    return os.getpid()


@shoal.task
async def leaves_a_task(gate: str) -> int:
    async def late() -> None:
        await asyncio.to_thread(wait_at, gate)
        print("late")

    asyncio.get_running_loop().create_task(late())
    return os.getpid()


@shoal.task
def slow_when(x: int, slow: int, gate: str) -> int:
    """Returns `x`; when it is `slow`, once the Gate at `gate` is open."""
    if x == slow:
        wait_at(gate)
    return x


@shoal.task
def noted(path: str, x: int, gate: str = "") -> int:
    """Note `x` in the file at `path` (each run), then return once the Gate at `gate` (if
    any) is open."""
    with open(path, "a") as f:
        f.write(f"{x}\n")
    if gate:
        wait_at(gate)
    return x


@shoal.task
async def noted_async(path: str, x: int, seconds: float = 0.0) -> int:
    with open(path, "a") as f:  # noqa: ASYNC230  (a test's note)
        f.write(f"{x}\n")
    await asyncio.sleep(seconds)
    return x


@shoal.task
def lies_and_dies(path: str) -> None:
    """Says in its worker's ledger that no call runs, then ends the worker."""
    import gc

    with open(path, "a") as f:
        f.write("ran\n")
    (ledger,) = [o for o in gc.get_objects() if type(o).__name__ == "Ledger"]
    ledger.running(0)
    os._exit(3)


@shoal.task
async def pid_in_a_thread() -> int:
    """Its worker's pid, found in a thread of the loop's default executor (which stays)."""
    return await asyncio.to_thread(os.getpid)


@shoal.task
def touch(path: str) -> None:
    Path(path).write_text("ran")


@shoal.task
def whoami() -> int:
    return os.getuid()


@shoal.task
def says_nonsense() -> str:
    """Writes frames of its own among its worker's, as code run in a worker can."""
    from shoal.node.functions import printed, wire

    own = printed._current
    assert own is not None
    for frame in (
        wire.encode_frame(99, own, 0.0, b"no such kind"),
        wire.encode_frame(wire.CALL, own, 0.0, b"a call, from a worker"),
        wire.encode_frame(wire.HELLO, own, 0.0, b"[]"),
        wire.encode_frame(wire.PROGRESS, own, float("nan"), b"\xff\xfe"),
        wire.encode_frame(wire.DONE, own + 1000, 0.0, b'"the result of a call it was not sent"'),
    ):
        wire.write_all(printed._out_fd, frame)
    return "said"


@shoal.task
def chatter(mib: int) -> int:
    """Prints `mib` MiB, 64 KiB at a time."""
    line = "x" * (64 * 1024 - 1)
    for _ in range(mib * 16):
        print(line)
    return mib


@shoal.task
def prints_undecodable(raw: str) -> str:
    """Prints a name as os.listdir gives one that is not UTF-8 (a lone surrogate in it)."""
    name = os.fsdecode(bytes.fromhex(raw))
    print(name)
    return "printed"


@shoal.task
def prints_lines(count: int, gate: str = "") -> int:
    """Reports progress `count` times, then prints `count` numbered lines, a hundred on
    stdout then a hundred on stderr in turn, then waits at the Gate `gate` (if any)."""
    import sys

    for i in range(count):
        shoal.progress(i / count, f"{i}")
    for i in range(count):
        print(i, file=sys.stderr if i // 100 % 2 else sys.stdout)
    if gate:
        wait_at(gate)
    return count


@shoal.task
def runs_commands(undecodable: str) -> int:
    """Prints, and has subprocesses and the process itself write on fd 1 and 2 (and through
    sys.stdout's fileno and buffer), a UTF-8 character cut across two writes among them."""
    import subprocess
    import sys

    print("first")
    subprocess.run(["sh", "-c", "echo from-a-command; echo to-its-stderr >&2"], check=True)
    print("then")
    os.write(1, "é".encode()[:1])
    os.write(1, "é".encode()[1:] + b"\n")
    os.write(2, bytes.fromhex(undecodable) + b"\n")
    subprocess.run(["echo", "through-fileno"], stdout=sys.stdout, check=True)
    sys.stdout.buffer.write(b"through-buffer\n")
    return 0


@shoal.task
def floods_a_pipe(size: int) -> int:
    """A subprocess writes `size` bytes on fd 1, far more than a pipe holds."""
    import subprocess

    subprocess.run(["head", "-c", str(size), "/dev/zero"], check=True)
    return size


@shoal.task
def closes_its_output() -> int:
    """Closes fd 1 and 2 of its worker (and returns its pid)."""
    os.close(1)
    os.close(2)
    return os.getpid()


@shoal.task
def prints_at_once(count: int) -> int:
    """Prints `count` characters in one write (more than one frame can hold, when many)."""
    print("é" * count, end="")
    return os.getpid()


@shoal.task
def forks_then_exits(marker: str, gate: str) -> None:
    """Forks a child that holds every file its worker has open (its pipes too) until the Gate
    `gate` opens and writes its pid to `marker`, then ends its worker (exit 3) without
    answering."""
    child = os.fork()
    if child == 0:
        wait_at(gate)
        os._exit(0)
    Path(marker).write_text(str(child))
    os._exit(3)


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str() for this one")


class NotAnException(BaseException):
    pass


class Picky(BaseModel):
    n: int

    @field_validator("n")
    @classmethod
    def _lookup(cls, n: int) -> int:
        return {1: 1}[n]  # a KeyError: pydantic passes it on, not a ValidationError


class Stubborn(BaseModel):
    n: int

    @field_serializer("n")
    def _out(self, n: int) -> int:
        raise LookupError("will not serialize")


@shoal.task
def raises(kind: str) -> int:
    """Raises what is named, or takes and returns models whose own code raises."""
    if kind == "unprintable":
        raise Unprintable
    if kind == "base":
        raise NotAnException("not an Exception")
    return os.getpid()


@shoal.task
def picky(p: Picky) -> int:
    return p.n


@shoal.task
def stubborn() -> Stubborn:
    return Stubborn(n=1)
