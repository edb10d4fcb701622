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

import _thread
import asyncio
import collections
import concurrent.futures
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
from types import TracebackType
from typing import Any

from shoal import _json
from shoal._codec import CodecError
from shoal._function import Function, functions_of
from shoal.node.functions import printed, wire
from shoal.node.functions.ledger import Ledger
from shoal.node.functions.wire import Frame, FrameReader, WireError, encode_frame

_FAST = 0.001  # seconds an answer may wait to go with the next ones (the pool's FAST)
_LOOK_AFTER = 0.0001  # seconds after which a call may have started a process or a timer
_LOOK_EVERY = 0.05  # seconds between thorough looks once all calls sent have run
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 1, 36  # prctl(2)


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


class _Call:
    """A call the node sent: its id, its function's name and arguments as JSON."""

    __slots__ = ("args", "id", "kwargs", "name", "upstream")

    def __init__(self, frame: Frame) -> None:
        self.id = frame.id
        self.name, self.args, self.kwargs, self.upstream = wire.decode_call(frame.data)


_Reply = tuple[int, bytes]
"""How a call ended: the kind of its last frame, and its data."""


def _arguments(fn: Function[Any, Any], call: _Call) -> tuple[list[Any], dict[str, Any]]:
    upstream: dict[str, str] = {}
    if call.upstream:
        given = wire.json_object(call.upstream)
        if given is None:
            raise CodecError("upstream results are not a JSON object")
        upstream = {str(k): str(v) for k, v in given.items()}
    return fn.codec.decode_arguments(call.args, call.kwargs, upstream)


def _bad(why: str) -> _Reply:
    return wire.BAD, why.encode(errors="replace")


def _theirs(err: BaseException) -> TracebackType | None:
    """The traceback of `err` from the function's own frames (the worker's passed over)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return tb or err.__traceback__


def _raised(err: BaseException) -> _Reply:
    try:
        message = str(err)
    except BaseException:  # an exception whose str() raises: its type says enough
        message = f"<{type(err).__qualname__}: str() failed>"
    return wire.RAISED, _json.dumps(
        {
            "type": f"{type(err).__module__}.{type(err).__qualname__}",
            "message": message[:10_000],
            "traceback": "".join(traceback.format_exception(type(err), err, _theirs(err)))[
                -100_000:
            ],
        }
    )


def _returned(fn: Function[Any, Any], value: Any, limit: int) -> _Reply:
    try:
        data = fn.codec.encode_result(value)
    except CodecError as err:
        return _bad(str(err))
    except BaseException as err:  # the value's own code (a serializer) raised
        return _raised(err)
    if len(data) > limit:
        return _bad(f"its result is {len(data):,} bytes of JSON, over the limit of {limit:,}")
    return wire.DONE, data


def _call_sync(fn: Function[Any, Any], call: _Call, limit: int) -> _Reply:
    """A sync function runs in the main thread: the node kills the worker to cancel it.
    Whatever the call raises (its arguments' validators too) is its outcome, never the end
    of the worker."""
    try:
        args, kwargs = _arguments(fn, call)
    except CodecError as err:
        return _bad(str(err))
    except BaseException as err:  # a validator of the function's types raised
        return _raised(err)
    try:
        value = fn.fn(*args, **kwargs)
    except BaseException as err:  # SystemExit and the like: the call's own
        return _raised(err)
    return _returned(fn, value, limit)


async def _call_async(fn: Function[Any, Any], call: _Call, limit: int) -> _Reply:
    try:
        args, kwargs = _arguments(fn, call)
    except CodecError as err:
        return _bad(str(err))
    except BaseException as err:  # a validator of the function's types raised
        return _raised(err)
    try:
        value = await fn.fn(*args, **kwargs)
    except asyncio.CancelledError:
        return wire.CANCELLED, b""
    except BaseException as err:  # SystemExit and the like: the call's own
        return _raised(err)
    return _returned(fn, value, limit)


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
    call: _Call,
    inp: _Input,
    queue: _Queue,
    replies: _Replies,
    limit: int,
) -> _Reply:
    """Run an async call on the worker's loop, taking in further frames meanwhile (and
    sending the answers held); a cancel frame (or the node going away) cancels it."""
    task = loop.create_task(_call_async(fn, call, limit))

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


def _left_behind(
    loop: asyncio.AbstractEventLoop,
    threads: int,
    wake: _Wake,
    *,
    asynchronous: bool,
    thorough: bool,
) -> str:
    """What the calls run left that later calls would run beside or be changed by: a thread,
    an asyncio task, a child process, a timer, their output replaced ('' if nothing). The
    looks that cost little after each call (`_serve` makes the two cheapest itself); all of
    them (`thorough`) after one that took a while (starting a process takes longer than a
    trivial call), and when the worker has run all it was sent, if it has not looked for
    _LOOK_EVERY."""
    if _threads() > threads:
        return "a thread running"
    if printed.replaced():
        return "sys.stdout or sys.stderr replaced"
    if loop.is_closed():
        return "the event loop closed"
    if asynchronous and asyncio.all_tasks(loop):
        return "an asyncio task pending"
    if not thorough:
        return ""
    if wire.WAKE is not None and signal.getsignal(wire.WAKE) is not wake:
        return "the node's signal taken over"
    if tampered := printed.tampered():
        return tampered
    if any(signal.getitimer(t)[0] for t in _TIMERS):  # (signal.alarm too)
        return "an alarm or interval timer set"
    if wire.WAKE is not None and wire.WAKE in signal.pthread_sigmask(signal.SIG_BLOCK, []):
        return "the node's signal blocked"
    with contextlib.suppress(ChildProcessError):  # its own, and orphans it adopts (subreaper)
        while True:
            pid, _ = os.waitpid(-1, os.WNOHANG)  # reaps the children that have ended
            if pid == 0:
                return "a child process running"
    return ""


_TIMERS = (signal.ITIMER_REAL, signal.ITIMER_VIRTUAL, signal.ITIMER_PROF)
_EXECUTOR = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="shoal-calls")
"""The worker's loop's default executor (asyncio.to_thread): its threads are the worker's."""


def _threads() -> int:
    """Python threads running besides the worker's own: threading's and _thread's alike."""
    return _thread._count() - len(_EXECUTOR._threads)


def _serve(
    functions: dict[str, Function[Any, Any]], inp: _Input, ledger: Ledger, limit: int
) -> str:
    """Run the calls in the order they came, until the node closes the pipe (''), or a call
    leaves something behind that would run beside, or change, the calls after it: then what
    it left (the worker is to end, and another takes its place)."""
    loop = asyncio.new_event_loop()
    loop.set_default_executor(_EXECUTOR)
    asyncio.set_event_loop(loop)
    asynchronous = {name for name, fn in functions.items() if inspect.iscoroutinefunction(fn.fn)}
    threads = _threads()
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
                wait = thorough_at + _LOOK_EVERY - time.perf_counter()
                if wait <= 0:  # (not in every wave's path: once in a while)
                    thorough_at, ran, wait = time.perf_counter(), False, None
                    if left := _left_behind(loop, threads, wake, asynchronous=True, thorough=True):
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
        if _threads() > threads:  # one an earlier call started, running only now
            replies.flush()
            return "a thread running that an earlier call started"  # the next runs elsewhere
        frame = queue.calls.popleft()
        try:
            call = _Call(frame)
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
                kind, data = _call_sync(fn, call, limit)
            finally:
                wake.running = None
        took = time.perf_counter() - started
        printed.end()  # what it printed goes before its answer
        replies.add(encode_frame(kind, call.id, took, data))
        ledger.running(0)
        if thorough := took >= _LOOK_AFTER:
            thorough_at = started + took
        # Most calls: two looks here, the others with the next thorough one.
        if (thorough or is_async or _threads() > threads or printed.replaced()) and (
            left := _left_behind(loop, threads, wake, asynchronous=is_async, thorough=thorough)
        ):
            replies.flush()
            return f"{call.name} left {left}"


def _adopt_orphans() -> None:
    """Be the parent of the orphans of the processes calls start (Linux: a subreaper), so that
    one that outlives its parent, a daemon's grandchild, is seen as left behind."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1)


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
    _adopt_orphans()
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
