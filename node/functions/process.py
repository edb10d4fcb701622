"""One warm function worker: `python -m shoal.node.functions.worker MODULE...` in its own
process group (so that the node can pause it with its task), started with asyncio, never
forked from the node (gRPC's fork handlers break forked children). The node writes it calls
and reads its frames straight from a pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence

from shoal.node.executors.taskuser import TaskUsers
from shoal.node.functions import ledger, wire
from shoal.node.functions.call import Call
from shoal.node.functions.wire import Frame, FrameReader, WireError

__all__ = ["FEED", "START_TIMEOUT", "WorkerProcess"]

_log = logging.getLogger("shoal.node")
START_TIMEOUT = 120.0  # seconds to import the modules: a while, on a loaded machine
_DRAIN = 0.5  # seconds the pipe of a worker that has exited is still read (what it wrote)
_EXIT = 5.0  # seconds a killed worker may take to exit (the kernel may hold it: a dead disk)
FEED = 8
"""The fewest frames posted to a worker in one turn of the loop that are written at once, not
at the turn's end; a later write of the turn holds at least as many as went before it. The
worker starts on the first while the node sends out the others, and is woken a few times a
turn (each wake-up costs it about what a trivial call does), not once every FEED calls."""


class WorkerProcess(asyncio.Protocol):
    """One worker: post calls and frames to it (written once per turn of the loop), kill it.
    Its frames are handed to `on_frames` as they are read (no task in between), and `on_end`
    is told once when it has ended or broken the protocol."""

    def __init__(
        self, proc: asyncio.subprocess.Process, lease: contextlib.AsyncExitStack, ledger_fd: int
    ) -> None:
        self.proc = proc
        self.pid = proc.pid
        self._lease: contextlib.AsyncExitStack | None = lease  # its user and directory (run_as)
        self._ledger = ledger_fd  # read once it has ended (shoal.node.functions.ledger)
        self.functions: list[str] = []
        self.errors: list[str] = []
        self.asynchronous: frozenset[str] = frozenset()
        self.held: dict[int, Call] = {}  # in the order sent: the first is running
        self._out: list[bytes] = []
        self._turn = False  # whether what is posted in this turn is to be written at its end
        self._written = 0  # frames written to it in this turn
        self.first: int | None = None  # the call it held first at the pool's last look
        self.stuck = False  # whether that call ran from one look to the next (no more calls)
        self.culprit: int | None = None  # the call it was killed for, if it was
        self.ran: int | None = None  # once it has ended: the call it was running (None: none)
        self.gone = False  # its pipe ended or it broke the protocol
        self.on_frames: Callable[[WorkerProcess, list[Frame]], None] | None = None
        self.on_end: Callable[[WorkerProcess], None] | None = None
        self._reader = FrameReader()
        self._transport: asyncio.ReadTransport | None = None
        self._pidfd = -1  # readable once its process has exited (Linux)
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
        read_fd = write_fd = ledger_fd = -1
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
            ledger_fd = ledger.create()
            env["SHOAL_WORKER_LEDGER"] = str(ledger_fd)
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=write_fd,
                env=env,
                cwd=cwd,
                start_new_session=True,
                pass_fds=(ledger_fd,),
            )
        except BaseException:
            for fd in (read_fd, write_fd, ledger_fd):
                if fd >= 0:
                    os.close(fd)
            await lease.aclose()
            raise
        os.close(write_fd)
        worker = cls(proc, lease, ledger_fd)
        pipe = os.fdopen(read_fd, "rb", buffering=0)  # its transport closes it
        try:
            await asyncio.get_running_loop().connect_read_pipe(lambda: worker, pipe)
            async with asyncio.timeout(START_TIMEOUT):
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
            worker._close_ledger()
            if worker._transport is None:  # it never had one
                pipe.close()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(proc.wait())
                await asyncio.shield(worker.release())
            raise
        worker._watch_exit()
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

    def _watch_exit(self) -> None:
        """Be told when its process exits, though another process may hold its pipe open (a
        child it forked): it is then ended once what it wrote before has been read. Where
        there is no pidfd (not Linux), its pipe's end tells."""
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            return
        asyncio.get_running_loop().add_reader(self._pidfd, self._exited)

    def _exited(self) -> None:
        self._unwatch()
        asyncio.get_running_loop().call_later(_DRAIN, self.end)

    def _unwatch(self) -> None:
        if self._pidfd >= 0:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1

    def end(self) -> None:
        """It is done with: killed, its pipes closed, and `on_end` told (once)."""
        if self.gone:
            return
        self.gone = True
        self.kill()
        self._unwatch()
        if self._transport is not None:
            self._transport.close()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        if not self._hello.done():
            self._hello.set_result(None)
        if self.on_end is not None:
            self.on_end(self)

    async def settled(self) -> None:
        """Once it has exited (`end` killed it), what its ledger says: the answers it held are
        handed on, after all it sent, and the call it was running is `ran`."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_EXIT):
                await self.proc.wait()
        if self._ledger < 0:
            return
        try:
            running, held = ledger.read(self._ledger)
        except OSError:
            return
        finally:
            self._close_ledger()
        self.ran = running if running in self.held else None
        if not held or self.on_frames is None:
            return
        reader = FrameReader()
        reader.feed(held)
        try:
            frames = reader.frames()
        except WireError as err:
            _log.warning("function worker pid=%d left a broken ledger: %s", self.pid, err)
            return
        self.on_frames(self, frames)

    # -- calls -----------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return not self.gone and self.proc.returncode is None and self.culprit is None

    @property
    def open(self) -> bool:
        """Whether it may be sent fast calls to queue behind those it holds."""
        return self.alive and not self.stuck

    def wake(self) -> None:
        """Have it take in the frames sent to it now, though it runs a sync call."""
        if wire.WAKE is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, wire.WAKE)

    def runs(self, call: Call) -> bool:
        """Whether it runs `call` now, as its ledger says (the first call it holds may have
        ended, its answer held)."""
        if self._ledger < 0:
            return False
        try:
            return ledger.running(self._ledger) == call.id
        except OSError:
            return False

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
        self._close_ledger()
        await self.release()

    async def release(self) -> None:
        """Give back its user and directory (run_as), once it has exited; the first call
        does, whoever makes it (the pool burying it, or closing)."""
        lease, self._lease = self._lease, None
        if lease is not None:
            await lease.aclose()

    def _close_ledger(self) -> None:
        if self._ledger >= 0:
            os.close(self._ledger)
            self._ledger = -1


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
