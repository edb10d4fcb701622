"""What a function call left behind that the calls after it in its worker would run beside,
or be changed by: a thread, an asyncio task, a child process (or an orphan of one: the worker
adopts them), a timer, its output replaced, the node's signal taken. A worker that finds one
ends once it has answered, and another takes its place."""

from __future__ import annotations

import _thread
import asyncio
import concurrent.futures
import contextlib
import ctypes
import os
import signal
import sys

from shoal.node.functions import printed, wire

__all__ = [
    "EXECUTOR",
    "LOOK_AFTER",
    "LOOK_EVERY",
    "adopt_orphans",
    "left_behind",
    "threads_running",
]

LOOK_AFTER = 0.0001  # seconds after which a call may have started a process or a timer
LOOK_EVERY = 0.05  # seconds between thorough looks once all calls sent have run
_PR_SET_CHILD_SUBREAPER = 36  # prctl(2)


def left_behind(
    loop: asyncio.AbstractEventLoop,
    threads: int,
    wake: object,
    *,
    asynchronous: bool,
    thorough: bool,
) -> str:
    """What the calls run left that later calls would run beside or be changed by: a thread,
    an asyncio task, a child process, a timer, their output replaced ('' if nothing). The
    looks that cost little after each call (the worker makes the two cheapest itself); all of
    them (`thorough`) after one that took a while (starting a process takes longer than a
    trivial call), and when the worker has run all it was sent, if it has not looked for
    LOOK_EVERY."""
    if threads_running() > threads:
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
EXECUTOR = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="shoal-calls")
"""The worker's loop's default executor (asyncio.to_thread): its threads are the worker's."""


def threads_running() -> int:
    """Python threads running besides the worker's own: threading's and _thread's alike."""
    return _thread._count() - len(EXECUTOR._threads)


def adopt_orphans() -> None:
    """Be the parent of the orphans of the processes calls start (Linux: a subreaper), so that
    one that outlives its parent, a daemon's grandchild, is seen as left behind."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1)
