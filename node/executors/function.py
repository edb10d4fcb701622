"""`function`: a `@shoal.task` function of the modules the node imports (`imports`), run in
one of its warm worker processes (shoal.node.functions.pool).

A cancel or timeout asks the worker to stop the call (an async function gets CancelledError);
a worker that does not within `_STOP_GRACE`, or that ran a sync function (which cannot be
interrupted), is killed and replaced. A worker that dies mid-call fails that attempt only, as
the task's failure: the node is not to blame for what the function did.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any

from shoal._output import set_result_text
from shoal.config import NodeSettings
from shoal.node.executors.base import ExecutionContext, Executor, Outcome, TaskError, register
from shoal.node.executors.process import NODE_ONLY_VARIABLES, _Tail
from shoal.node.functions.pool import WorkerPool, WorkerProcess
from shoal.v1 import node_pb2, task_pb2

__all__ = ["FunctionExecutor"]

_log = logging.getLogger("shoal.node")
_STOP_GRACE = 3.0  # seconds a cancelled call has to stop before its worker is killed
MAX_RESULT_BYTES = 1 << 20  # a function's return value, as JSON (the coordinator keeps 1 MiB)
_ENDS = frozenset({"done", "raised", "bad", "cancelled"})


def _worker_env() -> dict[str, str]:
    """The node's environment without its own settings and API keys, as tasks get it."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SHOAL_") and k not in NODE_ONLY_VARIABLES
    }
    env["SHOAL_WORKER_MAX_RESULT"] = str(MAX_RESULT_BYTES)
    return env


@dataclass
class _Call:
    worker: WorkerProcess
    id: int
    ctx: ExecutionContext
    out: _Tail
    err: _Tail
    name: str
    healthy: bool = False


@register
class FunctionExecutor(Executor):
    """Runs the functions of `settings.imports` in a pool of `settings.slots` workers."""

    name = "function"

    def __init__(self, settings: NodeSettings) -> None:
        super().__init__(settings)
        self._pool = WorkerPool(settings.imports, settings.slots, _worker_env())
        self._functions: frozenset[str] = frozenset()

    def available(self) -> bool:
        return bool(self.settings.imports)

    async def async_available(self) -> bool:
        try:
            await self._pool.start()
        except (OSError, TimeoutError, Exception) as err:
            _log.warning("function workers did not start: %s", err)
            return False
        for error in self._pool.errors:
            _log.warning("import failed in function workers: %s", error)
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
        if f.name not in self._functions:
            # The coordinator sends a function only to nodes that offer it: only a caller that
            # picked the node itself gets here.
            raise TaskError(f"function {f.name!r} is not offered here")
        worker = await self._pool.acquire()
        tail = ctx.output_tail_bytes
        call = _Call(worker, worker.next_id(), ctx, _Tail(tail), _Tail(tail), f.name)
        ctx.groups.add(worker.pid)
        try:
            return await self._call(call, f)
        finally:
            paused = ctx.groups.paused
            ctx.groups.discard(worker.pid)
            if paused:
                worker.resume()
            self._pool.release(worker, healthy=call.healthy)

    async def _call(self, call: _Call, f: task_pb2.FunctionSpec) -> Outcome:
        request = {
            "op": "call",
            "id": call.id,
            "name": f.name,
            "args": f.args.decode(errors="replace"),
            "kwargs": f.kwargs.decode(errors="replace"),
            "upstream": dict(f.upstream),
        }
        try:
            await call.worker.send(request)
            while True:
                message = await call.worker.receive()
                if message is None:
                    return await self._died(call)
                if message.get("id") != call.id:
                    continue
                if await self._take(call, message):
                    return self._outcome(call, message)
        except (BrokenPipeError, ConnectionResetError):
            return await self._died(call)
        except asyncio.CancelledError:
            await self._stop(call)
            raise

    async def _take(self, call: _Call, message: dict[str, Any]) -> bool:
        """Pass on an output or progress frame; whether the frame ends the call."""
        op = message.get("op")
        if op == "out":
            data = str(message.get("data", ""))
            if message.get("stream") == 2:
                stream, tail = task_pb2.OUTPUT_STREAM_STDERR, call.err
            else:
                stream, tail = task_pb2.OUTPUT_STREAM_STDOUT, call.out
            data = call.ctx.redactor.redact(data)
            tail.add(data)
            call.ctx.emit(task_pb2.OutputChunk(stream=stream, data=data))
            await call.ctx.paced()
        elif op == "progress":
            fraction, text = message.get("fraction"), message.get("message")
            if isinstance(fraction, (int, float)) and isinstance(text, str):
                call.ctx.progress(float(fraction), text)
        return op in _ENDS

    def _outcome(self, call: _Call, message: dict[str, Any]) -> Outcome:
        op = message["op"]
        call.healthy = not message.get("replace")
        result = task_pb2.TaskResult()
        set_result_text(result, "stdout", call.out.text())
        set_result_text(result, "stderr", call.err.text())
        if op == "done":
            value = str(message.get("value", "null"))
            if len(value) > MAX_RESULT_BYTES:  # the worker checks it too: unless it lies
                result.error = f"its result is over {MAX_RESULT_BYTES} bytes of JSON"
                return Outcome(task_pb2.TASK_STATE_FAILED, result)
            result.output.update({"value": value})
            return Outcome(task_pb2.TASK_STATE_SUCCEEDED, result)
        if op == "raised":
            kind, text = str(message.get("type", "")), str(message.get("message", ""))
            trace = call.ctx.redactor.redact(str(message.get("traceback", "")))
            call.ctx.emit(task_pb2.OutputChunk(stream=task_pb2.OUTPUT_STREAM_STDERR, data=trace))
            result.exit_code = 1
            result.error = f"{kind}: {text}"[:4000]
            result.output.update({"exception": {"type": kind, "message": text, "traceback": trace}})
            set_result_text(
                result, "stderr", (call.err.text() + trace)[-call.ctx.output_tail_bytes :]
            )
            return Outcome(task_pb2.TASK_STATE_FAILED, result)
        if op == "cancelled":  # it raised CancelledError by itself
            result.exit_code = 1
            result.error = "the function was cancelled (it raised CancelledError)"
            return Outcome(task_pb2.TASK_STATE_FAILED, result)
        result.error = str(message.get("error", "bad call"))[:4000]
        return Outcome(task_pb2.TASK_STATE_FAILED, result)

    async def _died(self, call: _Call) -> Outcome:
        call.healthy = False
        call.worker.kill()
        how = await call.worker.ended()
        _log.warning(
            "task=%s function worker pid=%d died: %s", call.ctx.task_id, call.worker.pid, how
        )
        result = task_pb2.TaskResult(exit_code=-9 if "SIGKILL" in how else 1)
        result.error = f"the function's worker process died ({how}); a new one replaces it"
        set_result_text(result, "stdout", call.out.text())
        set_result_text(result, "stderr", call.err.text())
        return Outcome(task_pb2.TASK_STATE_FAILED, result)

    async def _stop(self, call: _Call) -> None:
        """Ask the worker to stop an async call; kill it unless it does within the grace (a
        sync call cannot be interrupted: its worker is killed at once)."""
        call.healthy = False
        if call.name not in self._pool.asynchronous:
            call.worker.kill()
            return
        try:
            await call.worker.send({"op": "cancel", "id": call.id})
            async with asyncio.timeout(_STOP_GRACE):
                while (message := await call.worker.receive()) is not None:
                    if message.get("id") == call.id and message.get("op") in _ENDS:
                        call.healthy = not message.get("replace")
                        return
        except (TimeoutError, BrokenPipeError, ConnectionResetError, asyncio.CancelledError):
            pass
        with contextlib.suppress(Exception):
            call.worker.kill()
