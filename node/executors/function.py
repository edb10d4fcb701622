"""`function`: a `@shoal.task` function of the modules the node imports (`imports`), run in
one of its warm worker processes (shoal.node.functions.pool).

A cancel or timeout asks the worker to stop the call (an async function gets CancelledError;
a call still queued in the worker is dropped); a worker that does not within `_STOP_GRACE`,
or that runs the sync function (which cannot be interrupted), is killed and replaced. A
worker that dies mid-call fails that attempt only, as the task's failure (the node is not to
blame for what the function did); the calls queued behind it go to another worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from shoal import _json
from shoal._output import Stream, output_chunk, set_result_text
from shoal.config import NodeSettings
from shoal.errors import FailedPrecondition
from shoal.node.executors.base import ExecutionContext, Executor, Outcome, TaskError, register
from shoal.node.executors.process import _Tail, tasks_environment
from shoal.node.executors.python import runs_python
from shoal.node.executors.taskuser import TaskUsers
from shoal.node.functions import wire
from shoal.node.functions.call import REQUEUE, Call
from shoal.node.functions.pool import WorkerPool
from shoal.node.functions.process import START_TIMEOUT, WorkerProcess
from shoal.node.functions.wire import ENDS, Frame
from shoal.v1 import node_pb2, task_pb2

__all__ = ["FunctionExecutor"]

_log = logging.getLogger("shoal.node")
_STOP_GRACE = 3.0  # seconds a cancelled call has to stop before its worker is killed
_SLOW_START = 5.0  # seconds of importing after which the node says what it waits for
MAX_RESULT_BYTES = (1 << 20) - 4096
"""A function's return value, as JSON: what a coordinator keeps of a result by default (1 MiB,
`max_result_bytes`), less room for the result's other fields."""
_STREAMS: tuple[tuple[int, Stream], ...] = (
    (task_pb2.OUTPUT_STREAM_STDOUT, "stdout"),
    (task_pb2.OUTPUT_STREAM_STDERR, "stderr"),
)


def _worker_env() -> dict[str, str]:
    """The node's environment as tasks get it, and what the worker is to know."""
    env = tasks_environment()
    env["SHOAL_WORKER_MAX_RESULT"] = str(MAX_RESULT_BYTES)
    env["SHOAL_WORKER_NODE"] = str(os.getpid())  # its workers die with it
    return env


class _Run(Call):
    """A call of a task, and the last `output_tail_bytes` of each stream it printed on."""

    __slots__ = ("_tails", "ctx")

    def __init__(self, call_id: int, name: str, frame: bytes, ctx: ExecutionContext) -> None:
        super().__init__(call_id, name, frame)
        self.ctx = ctx
        self._tails: dict[int, _Tail] = {}  # most calls print nothing

    def keep(self, stream: int, text: str) -> None:
        tail = self._tails.get(stream)
        if tail is None:
            tail = self._tails[stream] = _Tail(self.ctx.output_tail_bytes)
        tail.add(text)

    def printed(self, stream: int) -> str:
        tail = self._tails.get(stream)
        return tail.text() if tail is not None else ""

    def put_printed(self, result: task_pb2.TaskResult) -> None:
        """What it printed into `result` (its stdout and stderr)."""
        if not self._tails:  # most calls
            return
        for stream, field in _STREAMS:
            if text := self.printed(stream):
                set_result_text(result, field, text)


@register
class FunctionExecutor(Executor):
    """Runs the functions of `settings.imports` in a pool of `settings.slots` workers."""

    name = "function"

    def __init__(self, settings: NodeSettings) -> None:
        super().__init__(settings)
        self.users = TaskUsers(settings.run_as)
        self._pool = WorkerPool(settings.imports, settings.slots, _worker_env(), self.users)
        self._functions: frozenset[str] = frozenset()
        self._ids = 0

    def available(self) -> bool:
        return bool(self.settings.imports)

    async def async_available(self) -> bool:
        """Whether its workers start: as the run_as user, the rule of `python` tasks (under
        "auto", the node's own user when others cannot run this interpreter). Not offered by
        the one-file executable, which holds no interpreter to run them."""
        if getattr(sys, "frozen", False):
            _log.warning("functions not offered: this shoal is one executable, with no Python")
            return False
        if self.users.switching and not await runs_python(self.users):
            if not self.users.auto:
                _log.error("functions not offered: the run_as user cannot run %s", sys.executable)
                return False
            _log.warning(
                "function workers run as the node's own user: other users cannot run %s",
                sys.executable,
            )
            self.users.give_up()
        modules = ", ".join(self._pool.modules)
        _log.info("function workers: importing %s in %d processes", modules, self._pool.size)
        slow = asyncio.get_running_loop().call_later(
            _SLOW_START,
            _log.warning,
            "function workers still importing %s after %g s: the node starts once they have"
            " (or after %g s without them)",
            modules,
            _SLOW_START,
            START_TIMEOUT,
        )
        try:
            await self._pool.start()
        except TimeoutError:
            _log.warning("function workers did not start within %g s: not offered", START_TIMEOUT)
            return False
        except Exception as err:
            _log.warning("function workers did not start: %s", err)
            return False
        finally:
            slow.cancel()
        if self._pool.errors:  # a mistake in --import: the node does not start without it
            await self._pool.aclose()
            where = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)
            raise FailedPrecondition(
                f"--import: {'; '.join(self._pool.errors)} (function workers import from"
                f" {where} and the installed packages)"
            )
        self._functions = frozenset(self._pool.functions)
        _log.info(
            "function workers=%d functions=%s", self._pool.size, ",".join(sorted(self._functions))
        )
        return bool(self._functions)

    def functions(self) -> list[str]:
        return sorted(self._functions)

    def offers(self, info: node_pb2.NodeInfo) -> None:
        info.functions.extend(self.functions())

    async def aclose(self) -> None:
        await self._pool.aclose()

    async def run(self, spec: task_pb2.TaskSpec, ctx: ExecutionContext) -> Outcome:
        f = spec.function
        name = f.name
        if name not in self._functions:
            # The coordinator sends a function only to nodes that offer it: only a caller that
            # picked the node itself gets here.
            raise TaskError(f"function {name!r} is not offered here")
        self._ids += 1
        upstream = _json.dumps(dict(f.upstream)) if f.upstream else b""
        frame = wire.encode_call(self._ids, name, f.args.encode(), f.kwargs.encode(), upstream)
        run = _Run(self._ids, name, frame, ctx)
        pool, groups = self._pool, ctx.groups
        try:
            while True:  # again when its worker died running another call
                worker = pool.send(run) or await pool.dispatch(run)
                groups.add(worker.pid)
                try:
                    # Its frames up to the last (most calls send only that one).
                    got = await run.next()
                    while got is not None and got is not REQUEUE and got.kind not in ENDS:
                        await self._pass_on(run, got)
                        got = await run.next()
                except asyncio.CancelledError:
                    await self._stop(run, worker)
                    raise
                finally:
                    if groups.paused:
                        worker.resume()
                    groups.discard(worker.pid)
                if got is None:
                    return await self._died(run, worker)
                if got is not REQUEUE:
                    outcome = self._outcome(run, got)
                    # Calls sent with it are about to end too: their reports go in one message.
                    outcome.more_follow = pool.fast_held > 0
                    return outcome
        finally:
            run.drop()

    async def _pass_on(self, call: _Run, frame: Frame) -> None:
        """Pass on an output or progress frame (and ignore any other)."""
        if frame.kind == wire.OUT:
            # Decoded as a process's output is: bytes that are not UTF-8 survive to the wire.
            text = call.ctx.redactor.redact(frame.data.decode(errors="surrogateescape"))
            if frame.number == 2:
                stream = task_pb2.OUTPUT_STREAM_STDERR
            else:
                stream = task_pb2.OUTPUT_STREAM_STDOUT
            call.keep(stream, text)
            call.ctx.emit(output_chunk(stream, text))
            await call.ctx.paced()
        elif frame.kind == wire.PROGRESS:
            call.ctx.progress(frame.number, frame.data.decode(errors="replace"))

    def _outcome(self, call: _Run, frame: Frame) -> Outcome:
        result = task_pb2.TaskResult()
        call.put_printed(result)
        if frame.kind == wire.DONE:
            if len(frame.data) > MAX_RESULT_BYTES:  # the worker checks it too: unless it lies
                result.exit_code = 1
                result.error = f"its result is over {MAX_RESULT_BYTES} bytes of JSON"
                return Outcome(task_pb2.TASK_STATE_FAILED, result)
            value = frame.data.decode(errors="replace")
            result.output.fields["value"].string_value = value
            return Outcome(task_pb2.TASK_STATE_SUCCEEDED, result)
        if frame.kind == wire.RAISED:
            raised = wire.json_object(frame.data)
            if raised is None:
                raised = {"message": "its worker sent an exception that is not JSON"}
            kind, text = str(raised.get("type", "")), str(raised.get("message", ""))
            trace = call.ctx.redactor.redact(str(raised.get("traceback", "")))
            call.ctx.emit(task_pb2.OutputChunk(stream=task_pb2.OUTPUT_STREAM_STDERR, data=trace))
            result.exit_code = 1
            result.error = f"{kind}: {text}"[:4000]
            result.output.update({"exception": {"type": kind, "message": text, "traceback": trace}})
            printed = call.printed(task_pb2.OUTPUT_STREAM_STDERR)
            set_result_text(result, "stderr", (printed + trace)[-call.ctx.output_tail_bytes :])
            return Outcome(task_pb2.TASK_STATE_FAILED, result)
        if frame.kind == wire.CANCELLED:  # it raised CancelledError by itself
            result.exit_code = 1
            result.error = "the function was cancelled (it raised CancelledError)"
            return Outcome(task_pb2.TASK_STATE_FAILED, result)
        result.exit_code = 1  # its arguments or its value did not fit, or no such function
        result.error = frame.data.decode(errors="replace")[:4000] or "bad call"
        return Outcome(task_pb2.TASK_STATE_FAILED, result)

    async def _died(self, run: _Run, worker: WorkerProcess) -> Outcome:
        how = await worker.ended()
        _log.warning("task=%s function worker pid=%d died: %s", run.ctx.task_id, worker.pid, how)
        result = task_pb2.TaskResult(exit_code=-9 if "SIGKILL" in how else 1)
        result.error = f"the function's worker process died ({how}); a new one replaces it"
        run.put_printed(result)
        return Outcome(task_pb2.TASK_STATE_FAILED, result)

    async def _stop(self, run: _Run, worker: WorkerProcess) -> None:
        """Stop a call: a call not yet run is dropped, an async one cancelled in place; a
        sync call its worker's ledger says it runs cannot be interrupted, so its worker is
        killed at once, as is a worker that has not answered within the grace (its other
        calls go to another)."""
        if run.worker is not worker or run.id not in worker.held or worker.gone:
            return  # it has ended, or its worker died (which decides how it ends)
        if run.name not in self._pool.asynchronous and worker.runs(run):
            worker.kill(run)
            return
        # Dropped if it has not started, cancelled in place if it is async; a worker amid a
        # sync call takes the cancel in at once, and sends the answers it held (this one's,
        # if it has ended: no kill then).
        self._pool.cancel(run)
        worker.wake()
        try:
            async with asyncio.timeout(_STOP_GRACE):
                while True:
                    frame = await run.next()
                    if frame is None or frame is REQUEUE or frame.kind in ENDS:
                        return
                    await self._pass_on(run, frame)  # what it printed as it stopped
        except (TimeoutError, asyncio.CancelledError):
            pass
        worker.kill(run)
