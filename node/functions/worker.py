"""A function worker: `python -m shoal.node.functions.worker MODULE...`, started by the node.

It imports the modules once, says which `@shoal.task` functions they hold, then runs the calls
the node sends, one at a time in the order sent, answering in batches: frames
(shoal.node.functions.wire) on fd 0 in, fd 1 out. A cancel drops a call not yet run, or
cancels a running async one (the node kills a worker to stop a running sync call). The
function's print and logging go back as output frames, and so does what its subprocesses and
C code write on fd 1 and 2, which become pipes the worker reads (the frames go on a
descriptor of their own).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import importlib
import inspect
import logging
import math
import os
import select
import signal
import sys
import time
import traceback
from typing import Any

from shoal import _json
from shoal._function import Function, functions_of
from shoal.node.functions import leftovers, printed, wire
from shoal.node.functions.calls import Call, Reply, call_async, call_sync
from shoal.node.functions.ledger import Ledger
from shoal.node.functions.leftovers import left_behind, threads_running
from shoal.node.functions.wire import Frame, FrameReader, WireError, encode_frame

_FAST = 0.001  # seconds an answer may wait to go with the next ones (the pool's FAST)
_PR_SET_PDEATHSIG = 1  # prctl(2)


def _load(modules: list[str]) -> tuple[dict[str, Function[Any, Any]], list[str]]:
    found: dict[str, Function[Any, Any]] = {}
    errors: list[str] = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except BaseException as err:  # a module that fails to import is reported, not fatal
            errors.append(f"{name}: {type(err).__name__}: {err}{_where(err)}")
            continue
        found.update(functions_of(module))
    return found, errors


def _where(err: BaseException) -> str:
    """Where in the modules imported `err` was raised: ' (file:line)', or '' (Shoal's own
    frames, and the import machinery's, are passed over)."""
    ours = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))  # the shoal package
    machinery = os.path.dirname(importlib.__file__)
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        if not frame.filename.startswith((ours, machinery, "<frozen")):
            return f" ({frame.filename}:{frame.lineno})"
    return ""


class _Input:
    """The node's frames on fd 0, read as they come (several per read)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.closed = False
        self._frames = FrameReader()
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def fill(self, *, block: bool, within: float | None = None) -> None:
        """Read what is there (waits for something when `block`, for `within` seconds at
        most if given)."""
        if self.closed:
            return
        if not block:
            within = 0.0
        if within is not None and not self._poll.poll(math.ceil(max(within, 0.0) * 1000)):
            return
        data = os.read(self.fd, 1 << 16)
        if not data:
            self.closed = True
        self._frames.feed(data)

    def frames(self) -> list[Frame]:
        """The whole frames read so far; WireError when one breaks the protocol."""
        return self._frames.frames()


class _Replies:
    """Answers held to be sent together: at the latest when no call is left to run, or between
    calls (looked at every FAST of the clock) once the first of them has waited FAST of this
    worker's CPU time. CPU time, not the clock: a worker that the machine's load holds back
    has not run the calls it was sent any sooner by sending what it has, and answers sent in
    pieces cost every process downstream a message each. They are held in the ledger, where
    the node finds them if the worker dies before it sends them."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._since = 0.0

    def add(self, frame: bytes) -> None:
        ledger = self._ledger
        if not ledger.held:
            self._since = time.process_time()
        if not ledger.hold(frame):
            self.flush()
            if not ledger.hold(frame):  # larger than a ledger holds: sent by itself
                printed.send(frame)

    def flush(self, *, unless_fresh: bool = False) -> None:
        ledger = self._ledger
        if not ledger.held or (unless_fresh and time.process_time() - self._since < _FAST):
            return
        printed.send(ledger.answers())
        ledger.clear()


class _Queue:
    """The calls sent and not yet run, in order."""

    def __init__(self, replies: _Replies) -> None:
        self.calls: collections.deque[Frame] = collections.deque()
        self._replies = replies

    def take(self, frames: list[Frame], running: int | None = None) -> bool:
        """Queue calls, drop the cancelled ones and the recalled ones not started; whether
        `running` was cancelled (a recall leaves it running)."""
        cancelled = False
        for frame in frames:
            if frame.kind == wire.CALL:
                self.calls.append(frame)
            elif frame.kind in (wire.CANCEL, wire.RECALL):
                if frame.id == running:
                    cancelled = cancelled or frame.kind == wire.CANCEL
                    continue
                for call in self.calls:
                    if call.id == frame.id:
                        self.calls.remove(call)
                        said = wire.CANCELLED if frame.kind == wire.CANCEL else wire.DROPPED
                        self._replies.add(encode_frame(said, frame.id))
                        break
        return cancelled


class _Wake:
    """The handler of the node's WAKE signal while a sync call runs: the frames sent since
    are taken in (recalls of the calls queued behind it among them: the node sends those
    calls elsewhere once their worker has answered that they will not run here), and the
    answers held are sent. Async calls take in frames as they come (`_run_async`)."""

    def __init__(self, inp: _Input, queue: _Queue, replies: _Replies) -> None:
        self.running: int | None = None  # the sync call running now
        self._inp, self._queue, self._replies = inp, queue, replies

    def __call__(self, signum: int, frame: Any) -> None:
        # Not in the worker's own code (between calls) nor amid output being held or sent.
        if self.running is None or printed.busy():
            return
        try:
            self._inp.fill(block=False)
            self._queue.take(self._inp.frames(), running=self.running)
        except (OSError, WireError):
            return  # the loop sees it once the call has returned
        self._replies.flush()

    def install(self) -> None:
        if wire.WAKE is not None:
            # Its system calls are interrupted (a blocking read, waitpid): Python runs this
            # handler, then goes on with them, as it does for any signal (PEP 475).
            signal.signal(wire.WAKE, self)


def _run_async(
    loop: asyncio.AbstractEventLoop,
    fn: Function[Any, Any],
    call: Call,
    inp: _Input,
    queue: _Queue,
    replies: _Replies,
    limit: int,
) -> Reply:
    """Run an async call on the worker's loop, taking in further frames meanwhile (and
    sending the answers held); a cancel frame (or the node going away) cancels it."""
    task = loop.create_task(call_async(fn, call, limit))

    def readable() -> None:
        try:
            inp.fill(block=True)
            cancelled = queue.take(inp.frames(), running=call.id)
            replies.flush()
        except (OSError, WireError):
            inp.closed, cancelled = True, True
        if inp.closed:
            loop.remove_reader(inp.fd)
        if cancelled or inp.closed:
            task.cancel()

    loop.add_reader(inp.fd, readable)
    try:
        reply = loop.run_until_complete(task)
    except asyncio.CancelledError:
        reply = wire.CANCELLED, b""
    finally:
        loop.remove_reader(inp.fd)
    return reply


def _serve(
    functions: dict[str, Function[Any, Any]], inp: _Input, ledger: Ledger, limit: int
) -> str:
    """Run the calls in the order they came, until the node closes the pipe (''), or a call
    leaves something behind that would run beside, or change, the calls after it: then what
    it left (the worker is to end, and another takes its place)."""
    loop = asyncio.new_event_loop()
    loop.set_default_executor(leftovers.EXECUTOR)
    asyncio.set_event_loop(loop)
    asynchronous = {name for name, fn in functions.items() if inspect.iscoroutinefunction(fn.fn)}
    threads = threads_running()
    replies = _Replies(ledger)
    queue = _Queue(replies)
    wake = _Wake(inp, queue, replies)
    wake.install()
    looked = time.perf_counter()
    thorough_at = 0.0  # when the last thorough look was
    ran = False  # whether a call has run since
    while True:
        if not queue.calls:
            replies.flush()
            wait = None  # as long as it takes, once all that ran has been looked at
            if ran:
                wait = thorough_at + leftovers.LOOK_EVERY - time.perf_counter()
                if wait <= 0:  # (not in every wave's path: once in a while)
                    thorough_at, ran, wait = time.perf_counter(), False, None
                    if left := left_behind(loop, threads, wake, asynchronous=True, thorough=True):
                        return f"a call left {left}"
            inp.fill(block=True, within=wait)
            queue.take(inp.frames())
            looked = time.perf_counter()
        elif time.perf_counter() - looked >= _FAST:
            # Between calls, now and then (not each time: a look costs what a trivial call
            # does): frames that came meanwhile (a cancel), answers that have waited.
            inp.fill(block=False)
            queue.take(inp.frames())
            replies.flush(unless_fresh=True)
            looked = time.perf_counter()
        if inp.closed:
            replies.flush()
            return ""  # the node closed the pipe: it is done with this worker
        if not queue.calls:
            continue
        if threads_running() > threads:  # one an earlier call started, running only now
            replies.flush()
            return "a thread running that an earlier call started"  # the next runs elsewhere
        frame = queue.calls.popleft()
        try:
            call = Call(frame)
        except WireError as err:
            replies.add(encode_frame(wire.BAD, frame.id, 0.0, str(err).encode()))
            continue
        fn = functions.get(call.name)
        if fn is None:
            replies.add(encode_frame(wire.BAD, call.id, 0.0, b"no such function here"))
            continue
        ledger.running(call.id)
        ran = True
        printed.begin(call.id)
        started = time.perf_counter()
        if is_async := fn.name in asynchronous:
            kind, data = _run_async(loop, fn, call, inp, queue, replies, limit)
        else:
            wake.running = call.id
            try:
                kind, data = call_sync(fn, call, limit)
            finally:
                wake.running = None
        took = time.perf_counter() - started
        printed.end()  # what it printed goes before its answer
        replies.add(encode_frame(kind, call.id, took, data))
        ledger.running(0)
        if thorough := took >= leftovers.LOOK_AFTER:
            thorough_at = started + took
        # Most calls: two looks here, the others with the next thorough one.
        if (thorough or is_async or threads_running() > threads or printed.replaced()) and (
            left := left_behind(loop, threads, wake, asynchronous=is_async, thorough=thorough)
        ):
            replies.flush()
            return f"{call.name} left {left}"


def _die_with_the_node() -> None:
    """Be killed when the node's process ends, however it ends (SIGKILL too), though an import
    or a call never returns (Linux: the parent-death signal; elsewhere the node's closed pipe
    tells, between calls)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    node = os.environ.get("SHOAL_WORKER_NODE", "")
    if node.isdigit() and os.getppid() != int(node):
        os._exit(1)  # the node ended before this was set


def _as_batch() -> None:
    """Run under SCHED_BATCH (Linux; the nice value, and so the share of the CPU, stay as
    they are): the node wakes its worker with each turn's first calls while it sends the rest,
    and a worker woken with the normal policy takes the node's core from it mid-turn, so that
    the turn's other calls wait on the first. A batch process is not let preempt on wakeup."""
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


def main() -> None:
    _die_with_the_node()
    leftovers.adopt_orphans()
    _as_batch()
    limit = int(os.environ.get("SHOAL_WORKER_MAX_RESULT", str(1 << 20)))
    inp = _Input(os.dup(0))
    ledger = Ledger(int(os.environ["SHOAL_WORKER_LEDGER"]))
    printed.install(os.dup(1))
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    printed.capture_descriptors()  # fd 1 and 2: the running call's output, not the frames
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, force=True)
    functions, errors = _load(sys.argv[1:])
    hello = {
        "functions": sorted(functions),
        "async": sorted(n for n, f in functions.items() if inspect.iscoroutinefunction(f.fn)),
        "errors": errors,
    }
    printed.send(encode_frame(wire.HELLO, 0, 0.0, _json.dumps(hello)))
    try:
        left = _serve(functions, inp, ledger, limit)
    except Exception:  # a bug of the worker's own: said in the node's log, not a call's output
        printed.to_node(f"function worker {os.getpid()} failed:\n{traceback.format_exc()}")
        raise SystemExit(1) from None
    if left:
        printed.to_node(f"function worker {os.getpid()} ends: {left}; another takes its place\n")
        os._exit(0)  # now: not after the threads a call left


if __name__ == "__main__":
    main()
