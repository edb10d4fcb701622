"""Warm worker processes that hold a node's imported functions: one per slot, replaced when
one dies or will not stop.

Each worker is `python -m shoal.node.functions.worker MODULE...` in its own process group
(so that the node can pause it with its task), started with asyncio, never forked from the
node (gRPC's fork handlers break forked children).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from shoal.node.functions.wire import WireError, async_read_frame, encode_frame

__all__ = ["WorkerPool", "WorkerProcess"]

_log = logging.getLogger("shoal.node")
_START_TIMEOUT = 120.0  # importing the modules may take a while on a loaded machine


class WorkerProcess:
    """One worker: send it frames, receive its frames, kill it."""

    def __init__(self, proc: asyncio.subprocess.Process, hello: dict[str, Any]) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.functions = sorted(str(f) for f in hello.get("functions") or [])
        self.errors = [str(e) for e in hello.get("errors") or []]
        self.asynchronous = frozenset(str(f) for f in hello.get("async") or [])
        self._next = 0

    @classmethod
    async def start(cls, modules: Sequence[str], env: Mapping[str, str]) -> WorkerProcess:
        """Start a worker and wait for it to say which functions it holds; OSError or
        WireError when it cannot start or says nothing sensible."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "shoal.node.functions.worker",
            *modules,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=dict(env),
            start_new_session=True,
        )
        try:
            assert proc.stdout is not None
            async with asyncio.timeout(_START_TIMEOUT):
                hello = await async_read_frame(proc.stdout)
            if hello is None or hello.get("op") != "hello":
                raise WireError(f"the worker ended as it started (exit {await proc.wait()})")
        except BaseException:
            _kill(proc.pid)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(proc.wait())
            raise
        return cls(proc, hello)

    def next_id(self) -> int:
        self._next += 1
        return self._next

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def send(self, message: dict[str, Any]) -> None:
        """BrokenPipeError / ConnectionResetError when the worker is gone."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(encode_frame(message))
        await self.proc.stdin.drain()

    async def receive(self) -> dict[str, Any] | None:
        """Its next frame; None when it has gone (or broke the protocol: it is killed)."""
        assert self.proc.stdout is not None
        try:
            return await async_read_frame(self.proc.stdout)
        except WireError as err:
            _log.warning("function worker pid=%d broke the protocol: %s", self.pid, err)
            self.kill()
            return None

    def kill(self) -> None:
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
        self.kill()
        await self.proc.wait()


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class WorkerPool:
    """`size` workers of `modules`; `acquire` one per call, `release` it after (a broken one
    is killed and replaced in the background)."""

    def __init__(self, modules: Sequence[str], size: int, env: Mapping[str, str]) -> None:
        self.modules = list(modules)
        self.size = size
        self._env = dict(env)
        self._idle: asyncio.Queue[WorkerProcess] = asyncio.Queue()
        self._all: set[WorkerProcess] = set()
        self._spawning: set[asyncio.Task[Any]] = set()
        self._closed = False
        self.functions: list[str] = []
        self.asynchronous: frozenset[str] = frozenset()  # async functions: cancelled in place
        self.errors: list[str] = []

    async def start(self) -> None:
        """Start every worker; OSError / WireError when none starts."""
        results = await asyncio.gather(
            *(WorkerProcess.start(self.modules, self._env) for _ in range(self.size)),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, WorkerProcess):
                self._add(r)
            elif isinstance(r, BaseException) and not isinstance(r, Exception):
                raise r
        if not self._all:
            error = next(r for r in results if isinstance(r, Exception))
            raise error
        first = next(iter(self._all))
        self.functions, self.errors = first.functions, first.errors
        self.asynchronous = first.asynchronous
        for _ in range(self.size - len(self._all)):
            self._spawn()

    def _add(self, worker: WorkerProcess) -> None:
        self._all.add(worker)
        self._idle.put_nowait(worker)

    async def acquire(self) -> WorkerProcess:
        """An idle, live worker (waits for one)."""
        while True:
            worker = await self._idle.get()
            if worker.alive:
                return worker
            self._replace(worker)

    def release(self, worker: WorkerProcess, *, healthy: bool) -> None:
        """Give a worker back after a call; one that is not healthy is replaced."""
        if healthy and worker.alive and not self._closed:
            self._idle.put_nowait(worker)
        else:
            self._replace(worker)

    def _replace(self, worker: WorkerProcess) -> None:
        worker.kill()
        self._all.discard(worker)
        reap = asyncio.create_task(worker.proc.wait())
        self._spawning.add(reap)
        reap.add_done_callback(self._spawning.discard)
        self._spawn()

    def _spawn(self) -> None:
        if self._closed:
            return
        task = asyncio.create_task(self._start_one(), name="shoal-function-worker")
        self._spawning.add(task)
        task.add_done_callback(self._spawning.discard)

    async def _start_one(self) -> None:
        delay = 0.5
        while not self._closed:
            try:
                worker = await WorkerProcess.start(self.modules, self._env)
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
        for task in list(self._spawning):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._spawning, return_exceptions=True)
        await asyncio.gather(*(w.aclose() for w in self._all), return_exceptions=True)
        self._all.clear()
