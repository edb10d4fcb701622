"""The warm worker processes that hold a node's imported functions: one per slot, replaced
when one dies or will not stop, and the calls sent to them.

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
import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from shoal.node.executors.taskuser import TaskUsers
from shoal.node.functions import wire
from shoal.node.functions.call import REQUEUE, Call
from shoal.node.functions.process import WorkerProcess
from shoal.node.functions.wire import ENDS, Frame, WireError

__all__ = ["DEATHS", "DEPTH", "FAST", "WorkerPool", "depth_for"]

_log = logging.getLogger("shoal.node")
FAST = 0.001
"""Seconds under which a function's calls count as fast: such calls may queue in a worker."""
DEPTH = 16
"""The most calls one worker holds at once where the machine has a core for each worker."""
DEATHS = 5
"""Deaths of its workers a call is sent elsewhere after (none blamed on it); then it fails."""
STUCK = 0.05
"""Seconds between looks for a worker whose first call has not ended (see WorkerPool._look):
the calls queued behind one that has run this long, at least, go elsewhere."""


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
        self._looks: asyncio.TimerHandle | None = None  # for stuck calls, while fast ones are held
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
        if fast and batch is not None and len(batch.held) < self.depth and batch.open:
            return batch
        idle = next((w for w in self._all if not w.held and w.alive), None)
        if idle is None and fast:
            idle = min((w for w in self._all if w.open), key=lambda w: len(w.held), default=None)
            if idle is not None and len(idle.held) >= self.depth:
                idle = None
        if idle is not None and fast:  # the turn's next fast calls go with this one
            if self._batch is None:
                asyncio.get_running_loop().call_soon(self._end_turn)
            self._batch = idle
        return idle

    def _end_turn(self) -> None:
        self._batch = None

    def send(self, call: Call) -> WorkerProcess | None:
        """Send a call to a worker that can take it now; None when none can (`dispatch`)."""
        call.fast = self.fast(call.name)
        worker = self._choose(call)
        if worker is not None:
            call.worker = worker
            call.recalled = False
            self.fast_held += call.fast
            worker.held[call.id] = call
            worker.post(call.frame)
            if call.fast and self._looks is None:
                self._looks = asyncio.get_running_loop().call_later(STUCK, self._look)
        return worker

    def _look(self) -> None:
        """Every STUCK while fast calls are held: a worker whose first call has not ended
        since the last look (a fast function's call that is not fast) gets no more calls,
        and the calls queued behind it are recalled, to go to other workers once it has
        answered that it will not run them (`_route`); it sends the answers it held too."""
        self._looks = None
        for worker in self._all:
            head = next(iter(worker.held), None)
            if head is None or head != worker.first:
                worker.first, worker.stuck = head, False
                continue
            worker.stuck = True
            behind = list(worker.held.values())[1:]
            for call in behind:
                if not call.recalled:
                    call.recalled = True
                    worker.post(wire.encode_frame(wire.RECALL, call.id))
            worker.flush()
            if behind:  # (again, until it has answered: it may have been amid output)
                worker.wake()
        if self.fast_held > 0:
            self._looks = asyncio.get_running_loop().call_later(STUCK, self._look)

    async def dispatch(self, call: Call) -> WorkerProcess:
        """Send a call to a worker that can take it (waits for one)."""
        while (worker := self.send(call)) is None:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        return worker

    def cancel(self, call: Call) -> None:
        """Ask the worker to drop a call it has not run yet, or cancel it (async) in place."""
        if call.worker is not None and call.id in call.worker.held:
            call.worker.post(wire.encode_frame(wire.CANCEL, call.id))

    def _ended(self, worker: WorkerProcess) -> None:
        """A worker has gone: it is sent no more calls, and is buried (in the background)."""
        with contextlib.suppress(ValueError):
            self._all.remove(worker)
        self._notify()
        self._background(self._bury(worker), "shoal-function-worker")

    async def _bury(self, worker: WorkerProcess) -> None:
        """Once it has exited: its calls answered in its ledger get their answers, the call
        it was running fails (or the one it was killed for), the others go to another worker
        (they never ran); then another takes its place."""
        await worker.settled()
        held = list(worker.held.values())
        worker.held.clear()
        self.fast_held -= sum(call.fast for call in held)
        # It runs its calls in order: the one it ran, if any, is the first it had not
        # answered (a ledger that says otherwise lies). A call whose workers keep dying
        # without one to blame (a function that lies in its ledger) fails in the end.
        ran = worker.ran if held and worker.ran == held[0].id else None
        for call in held:
            call.worker = None
            if call.id in (worker.culprit, ran):
                call.put(None)
            else:
                call.deaths += 1
                call.put(None if call.deaths > DEATHS else REQUEUE)
        self._notify()
        await worker.release()  # before another takes its user (run_as)
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
                del held[frame.id]
                freed = True
                self.fast_held -= call.fast
                if frame.kind == wire.DROPPED:  # recalled before it started
                    call.worker = None
                    call.put(REQUEUE)  # to another worker
                    continue
                # A share, so that a few slow calls (the machine's load) count for no more
                # than a few.
                shares = self._fast_share
                shares[call.name] = 0.8 * shares.get(call.name, 0.0) + (
                    0.2 if frame.number < self.fast_below else 0.0
                )
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
        if self._looks is not None:
            self._looks.cancel()
        workers, self._all = list(self._all), []
        await asyncio.gather(*(w.aclose() for w in workers), return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
