"""Warm worker processes that hold a node's imported functions: one per slot, replaced when
one dies or will not stop.

Each worker is `python -m shoal.node.functions.worker MODULE...` in its own process group
(so that the node can pause it with its task), started with asyncio, never forked from the
node (gRPC's fork handlers break forked children).

Calls are pipelined: a worker holds up to `depth_for` calls (DEPTH, or more when the workers
outnumber the cores that can run them), runs them in the order sent and answers in batches;
the calls started in one turn of the event loop go to it in writes that each double what it
was sent in the turn (an idle worker gets the first at once), and once it holds its depth the
next ones go to one more worker.
Only calls of a function known to be fast (most of its recent calls took under `FAST`) queue
behind others; any other call waits for an idle worker. A worker that dies fails the oldest
call it held (the one it ran: the worker sends the answers of earlier calls before it starts
one once they are about `FAST` old), and its other calls are sent to another worker.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from shoal.node.executors.taskuser import TaskUsers
from shoal.node.functions import wire
from shoal.node.functions.wire import ENDS, Frame, FrameReader, WireError

__all__ = [
    "BACKLOG",
    "DEPTH",
    "FAST",
    "REQUEUE",
    "Call",
    "WorkerPool",
    "WorkerProcess",
    "depth_for",
]

_log = logging.getLogger("shoal.node")
_START_TIMEOUT = 120.0  # importing the modules may take a while on a loaded machine
FAST = 0.001
"""Seconds under which a function's calls count as fast: such calls may queue in a worker."""
DEPTH = 16
"""The most calls one worker holds at once where the machine has a core for each worker."""
FEED = 4
"""The fewest frames posted to a worker in one turn of the loop that are written at once, not
at the turn's end; a later write of the turn holds at least as many as went before it. The
worker starts on the first while the node sends out the others, and is woken a few times a
turn (each wake-up costs it about what a trivial call does), not once every FEED calls."""
REQUEUE = Frame(-1, 0)
"""Put in a call's frames when its worker died running another call: send it again."""


BACKLOG = 1 << 20
"""Bytes of a call's frames the node holds, not yet taken, beyond which it stops reading its
worker's pipe (the worker then waits on its writes) until it takes them: a function printing
faster than its output is carried cannot grow the node's memory."""


class Call:
    """One call: its CALL frame, and the frames its worker sends of it (None: the worker died
    running it; REQUEUE: the worker died before it ran it), to be taken in order by `next`."""

    __slots__ = (
        "_frames",
        "_queued",
        "_stalled",
        "_waiter",
        "fast",
        "frame",
        "id",
        "name",
        "worker",
    )

    def __init__(self, call_id: int, name: str, frame: bytes) -> None:
        self.id = call_id
        self.name = name
        self.frame = frame
        self.worker: WorkerProcess | None = None
        self.fast = False  # whether it was sent as a fast call (it may queue behind others)
        self._frames: collections.deque[Frame | None] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._queued = 0  # bytes of the frames not yet taken
        self._stalled: WorkerProcess | None = None  # a worker not read until they are taken

    def put(self, frame: Frame | None) -> None:
        self._frames.append(frame)
        if frame is not None and frame.data:
            self._queued += len(frame.data)
            if self._queued > BACKLOG and self.worker is not None and self._stalled is None:
                self._stalled = self.worker
                self._stalled.pause_reading()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self) -> Frame | None:
        """The next frame (waits for it)."""
        while not self._frames:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        frame = self._frames.popleft()
        if frame is not None and frame.data:
            self._queued -= len(frame.data)
            if self._stalled is not None and self._queued <= BACKLOG // 2:
                self._unstall()
        return frame

    def drop(self) -> None:
        """Let go of the frames not taken (its outcome is known without them)."""
        self._frames.clear()
        self._queued = 0
        self._unstall()

    def _unstall(self) -> None:
        if self._stalled is not None:
            self._stalled.resume_reading()
            self._stalled = None


class WorkerProcess(asyncio.Protocol):
    """One worker: post calls and frames to it (written once per turn of the loop), kill it.
    Its frames are handed to `on_frames` as they are read (no task in between), and `on_end`
    is told once when it has ended or broken the protocol."""

    def __init__(self, proc: asyncio.subprocess.Process, lease: contextlib.AsyncExitStack) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.lease = lease  # its user and directory (run_as)
        self.functions: list[str] = []
        self.errors: list[str] = []
        self.asynchronous: frozenset[str] = frozenset()
        self.held: dict[int, Call] = {}  # in the order sent: the first is running
        self._out: list[bytes] = []
        self._turn = False  # whether what is posted in this turn is to be written at its end
        self._written = 0  # frames written to it in this turn
        self.culprit: int | None = None  # the call it was killed for, if it was
        self.gone = False  # its pipe ended or it broke the protocol
        self.on_frames: Callable[[WorkerProcess, list[Frame]], None] | None = None
        self.on_end: Callable[[WorkerProcess], None] | None = None
        self._reader = FrameReader()
        self._transport: asyncio.ReadTransport | None = None
        self._hello: asyncio.Future[list[Frame] | None] = asyncio.get_running_loop().create_future()

    @classmethod
    async def start(
        cls, modules: Sequence[str], env: Mapping[str, str], users: TaskUsers | None = None
    ) -> WorkerProcess:
        """Start a worker (as a user of `users`, the node's run_as, for its whole life) and
        wait for it to say which functions it holds; OSError or WireError when it cannot start
        or says nothing sensible."""
        lease = contextlib.AsyncExitStack()
        argv = [sys.executable, "-m", "shoal.node.functions.worker", *modules]
        env = dict(env)
        cwd = None
        read_fd = write_fd = -1
        try:
            leased = await lease.enter_async_context(users.lease(None)) if users else None
            if leased is not None:
                argv, cwd = leased.user.argv(argv), leased.home
                # Its modules are found where the node finds them, not in its own directory.
                env["PYTHONPATH"] = os.pathsep.join(
                    p for p in (env.get("PYTHONPATH"), os.getcwd()) if p
                )
            # Its output is read straight from a pipe: a subprocess's own pipes hand what is
            # read on in a later turn of the loop.
            read_fd, write_fd = os.pipe()
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=write_fd,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        except BaseException:
            for fd in (read_fd, write_fd):
                if fd >= 0:
                    os.close(fd)
            await lease.aclose()
            raise
        os.close(write_fd)
        worker = cls(proc, lease)
        pipe = os.fdopen(read_fd, "rb", buffering=0)  # its transport closes it
        try:
            await asyncio.get_running_loop().connect_read_pipe(lambda: worker, pipe)
            async with asyncio.timeout(_START_TIMEOUT):
                said = await asyncio.shield(worker._hello)
            if said is None:
                raise WireError(f"the worker ended as it started (exit {await proc.wait()})")
            if len(said) > 1 or said[0].kind != wire.HELLO:
                raise WireError("the worker did not start with a hello")
            hello = wire.json_object(said[0].data)
            if hello is None:
                raise WireError("the worker's hello is not a JSON object")
        except BaseException:
            worker.end()
            if worker._transport is None:  # it never had one
                pipe.close()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(proc.wait())
                await asyncio.shield(lease.aclose())
            raise
        worker.functions = sorted(str(f) for f in hello.get("functions") or [])
        worker.errors = [str(e) for e in hello.get("errors") or []]
        worker.asynchronous = frozenset(str(f) for f in hello.get("async") or [])
        return worker

    # -- its output pipe (asyncio.Protocol) ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.ReadTransport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            while frames := self._reader.frames():
                if self.on_frames is not None:
                    self.on_frames(self, frames)
                elif not self._hello.done():
                    self._hello.set_result(frames)
                else:
                    raise WireError("it spoke before it was sent a call")
        except WireError as err:
            _log.warning("function worker pid=%d broke the protocol: %s", self.pid, err)
            self.end()
        except Exception:  # a frame no check foresaw: its calls must not wait forever
            _log.exception("function worker pid=%d sent a frame not understood", self.pid)
            self.end()

    def eof_received(self) -> None:
        self.end()

    def connection_lost(self, exc: Exception | None) -> None:
        self.end()

    def pause_reading(self) -> None:
        if self._transport is not None and not self.gone:
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None and not self.gone:
            self._transport.resume_reading()

    def end(self) -> None:
        """It is done with: killed, its pipe closed, and `on_end` told (once)."""
        if self.gone:
            return
        self.gone = True
        self.kill()
        if self._transport is not None:
            self._transport.close()
        if not self._hello.done():
            self._hello.set_result(None)
        if self.on_end is not None:
            self.on_end(self)

    # -- calls -----------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return not self.gone and self.proc.returncode is None and self.culprit is None

    def running(self, call: Call) -> bool:
        """Whether `call` is the one it runs now (or will run next)."""
        return next(iter(self.held), None) == call.id

    def post(self, data: bytes) -> None:
        """Write `data` at the end of this turn of the event loop, with whatever else is posted
        to the worker in it; or at once when the worker holds nothing else (it was idle), or
        when as many frames wait as were written in the turn (and FEED), so that it starts on
        them while the rest go out."""
        if not self._turn:
            self._turn = True
            asyncio.get_running_loop().call_soon(self._end_turn)
        self._out.append(data)
        if len(self._out) >= max(FEED, self._written) or len(self.held) <= 1:
            self.flush()

    def _end_turn(self) -> None:
        self.flush()
        self._turn = False
        self._written = 0

    def flush(self) -> None:
        """Write what was posted now (rather than at the end of the turn)."""
        if not self._out:
            return
        self._written += len(self._out)
        data, self._out = b"".join(self._out), []
        stdin = self.proc.stdin
        if not data or stdin is None or stdin.is_closing():
            return
        with contextlib.suppress(OSError):  # a dead worker: its pipe's end is seen
            stdin.write(data)

    def kill(self, culprit: Call | None = None) -> None:
        if culprit is not None and self.culprit is None:
            self.culprit = culprit.id
        _kill(self.pid)

    def resume(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGCONT)

    async def ended(self) -> str:
        """How it ended (waits for it): "exit 3" or "killed by SIGKILL"."""
        code = await self.proc.wait()
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit {code}"

    async def aclose(self) -> None:
        """Ask it to end (its input closes), then kill what is left of its group."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await self.proc.wait()
        self.end()
        await self.proc.wait()
        await self.lease.aclose()


def depth_for(size: int, cores: int) -> int:
    """The most calls one of `size` workers holds on a machine of `cores`: DEPTH, or enough
    that a turn's calls go to no more workers than the cores besides the node's own can run
    at once. Each worker sent calls costs the node a write, a wake-up and a read per batch;
    workers beyond the cores only queue for them (64 slots on 2 cores: one worker of 64
    calls, not four of 16)."""
    spare = max(1, cores - 1)
    return max(DEPTH, -(-size // spare))


def _cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class WorkerPool:
    """`size` workers of `modules`; `dispatch` sends a call to one, whose frames then arrive
    in the call's queue. A worker that dies is replaced in the background."""

    def __init__(
        self,
        modules: Sequence[str],
        size: int,
        env: Mapping[str, str],
        users: TaskUsers | None = None,
    ) -> None:
        self.modules = list(modules)
        self.users = users
        self.size = size
        self.depth = depth_for(size, _cores())
        self._env = dict(env)
        self._all: list[WorkerProcess] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._waiters: list[asyncio.Future[None]] = []  # dispatches waiting for room
        self._batch: WorkerProcess | None = None  # where this turn's fast calls go
        self._fast_share: dict[str, float] = {}  # of a function's recent calls, how many fast
        self.fast_below = FAST
        self.fast_held = 0  # fast calls held by workers now
        self.functions: list[str] = []
        self.asynchronous: frozenset[str] = frozenset()  # async functions: cancelled in place
        self.errors: list[str] = []

    async def start(self) -> None:
        """Start every worker; OSError / WireError when none starts."""
        results = await asyncio.gather(
            *(WorkerProcess.start(self.modules, self._env, self.users) for _ in range(self.size)),
            return_exceptions=True,
        )
        started = [r for r in results if isinstance(r, WorkerProcess)]
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, Exception):
                raise r
        if not started:
            raise next(r for r in results if isinstance(r, Exception))
        self.functions, self.errors = started[0].functions, started[0].errors
        self.asynchronous = started[0].asynchronous
        for worker in started:
            self._add(worker)
        for _ in range(self.size - len(started)):
            self._spawn()

    def _background(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _add(self, worker: WorkerProcess) -> None:
        self._all.append(worker)
        worker.on_frames, worker.on_end = self._route, self._ended
        if worker.gone:  # it ended before it was added
            self._ended(worker)
        self._notify()

    def _notify(self) -> None:
        """Room may have come: every waiting dispatch looks again."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def fast(self, name: str) -> bool:
        """Whether calls of `name` may queue behind others (its recent calls were fast)."""
        return self._fast_share.get(name, 0.0) > 0.5

    def _choose(self, call: Call) -> WorkerProcess | None:
        fast = call.fast
        batch = self._batch
        if fast and batch is not None and len(batch.held) < self.depth and batch.alive:
            return batch
        idle = next((w for w in self._all if not w.held and w.alive), None)
        if idle is None and fast:
            idle = min((w for w in self._all if w.alive), key=lambda w: len(w.held), default=None)
            if idle is not None and len(idle.held) >= self.depth:
                idle = None
        if idle is not None and fast:  # the turn's next fast calls go with this one
            if self._batch is None:
                asyncio.get_running_loop().call_soon(self._end_turn)
            self._batch = idle
        return idle

    def _end_turn(self) -> None:
        self._batch = None

    async def dispatch(self, call: Call) -> WorkerProcess:
        """Send a call to a worker that can take it (waits for one)."""
        call.fast = self.fast(call.name)
        while (worker := self._choose(call)) is None:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        call.worker = worker
        self.fast_held += call.fast
        worker.held[call.id] = call
        worker.post(call.frame)
        return worker

    def cancel(self, call: Call) -> None:
        """Ask the worker to drop a call it has not run yet, or cancel it (async) in place."""
        if call.worker is not None and call.id in call.worker.held:
            call.worker.post(wire.encode_frame(wire.CANCEL, call.id))

    def _ended(self, worker: WorkerProcess) -> None:
        """A worker has gone: fail the call it ran, send its others to another, replace it."""
        held = list(worker.held.values())
        worker.held.clear()
        self.fast_held -= sum(call.fast for call in held)
        with contextlib.suppress(ValueError):
            self._all.remove(worker)
        for i, call in enumerate(held):
            ran = call.id == worker.culprit if worker.culprit is not None else i == 0
            call.worker = None
            call.put(None if ran else REQUEUE)
        self._notify()
        self._background(self._replace(worker), "shoal-function-worker")

    async def _replace(self, worker: WorkerProcess) -> None:
        await worker.proc.wait()
        await worker.lease.aclose()  # before another takes its user (run_as)
        await self._start_one()

    def _route(self, worker: WorkerProcess, frames: list[Frame]) -> None:
        """Pass each frame to its call."""
        held = worker.held
        freed = False
        for frame in frames:
            call = held.get(frame.id)
            if call is None:
                continue  # a call given up on, or a worker that says nonsense
            if frame.kind in ENDS:
                del held[call.id]
                freed = True
                self.fast_held -= call.fast
                # A share, so that a few slow calls (the machine's load) count for no more
                # than a few.
                share = self._fast_share.get(call.name, 0.0)
                self._fast_share[call.name] = 0.8 * share + 0.2 * (frame.number < self.fast_below)
            call.put(frame)
        if freed and self._waiters:
            self._notify()

    def _spawn(self) -> None:
        if not self._closed:
            self._background(self._start_one(), "shoal-function-worker")

    async def _start_one(self) -> None:
        delay = 0.5
        while not self._closed:
            try:
                worker = await WorkerProcess.start(self.modules, self._env, self.users)
            except (OSError, WireError, TimeoutError) as err:
                _log.warning("a function worker did not start: %s; trying again", err)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            if self._closed:
                await worker.aclose()
                return
            self._add(worker)
            return

    async def aclose(self) -> None:
        self._closed = True
        workers, self._all = list(self._all), []
        await asyncio.gather(*(w.aclose() for w in workers), return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
