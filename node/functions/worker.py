"""A function worker: `python -m shoal.node.functions.worker MODULE...`, started by the node.

It imports the modules once, says which `@shoal.task` functions they hold, then runs one call
at a time as the node asks: frames (shoal.node.functions.wire) on fd 0 in, fd 1 out. The
function's print and logging go back as output frames; fd 1 and 2 of the process itself then
point at the node's stderr, so what C code writes there cannot break the frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import io
import logging
import os
import sys
import threading
import traceback
from typing import Any

from shoal import _progress
from shoal._codec import CodecError
from shoal._function import Function, functions_of
from shoal.node.functions.wire import encode_frame, read_frame, write_all

_send_lock = threading.Lock()
_out_fd = -1
_current: int | None = None  # the id of the call running now


def send(message: dict[str, Any]) -> None:
    data = encode_frame(message)
    with _send_lock:
        write_all(_out_fd, data)


class _OutputFrames(io.TextIOBase):
    """sys.stdout / sys.stderr: each write goes to the node as the running call's output."""

    def __init__(self, stream: int) -> None:
        self._stream = stream

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if text and _current is not None:
            send({"op": "out", "id": _current, "stream": self._stream, "data": text})
        return len(text)


def _progress_frame(fraction: float, message: str) -> None:
    if _current is not None:
        send({"op": "progress", "id": _current, "fraction": fraction, "message": message[:1000]})


def _load(modules: list[str]) -> tuple[dict[str, Function[Any, Any]], list[str]]:
    found: dict[str, Function[Any, Any]] = {}
    errors: list[str] = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except BaseException as err:  # a module that fails to import is reported, not fatal
            errors.append(f"{name}: {type(err).__name__}: {err}")
            continue
        found.update(functions_of(module))
    return found, errors


async def _call(fn: Function[Any, Any], message: dict[str, Any], limit: int) -> dict[str, Any]:
    call_id = message["id"]
    try:
        args, kwargs = fn.codec.decode_arguments(
            str(message.get("args", "")).encode(),
            str(message.get("kwargs", "")).encode(),
            {str(k): str(v) for k, v in dict(message.get("upstream") or {}).items()},
        )
    except CodecError as err:
        return {"op": "bad", "id": call_id, "error": str(err)}
    try:
        if inspect.iscoroutinefunction(fn.fn):
            value = await fn.fn(*args, **kwargs)
        else:
            value = await asyncio.to_thread(fn.fn, *args, **kwargs)
    except asyncio.CancelledError:
        # A sync function runs on in its thread: this worker must be replaced.
        sync = not inspect.iscoroutinefunction(fn.fn)
        return {"op": "cancelled", "id": call_id, "replace": sync}
    except (Exception, SystemExit, KeyboardInterrupt) as err:
        return {
            "op": "raised",
            "id": call_id,
            "type": f"{type(err).__module__}.{type(err).__qualname__}",
            "message": str(err)[:10_000],
            "traceback": "".join(traceback.format_exception(err))[-100_000:],
        }
    try:
        text = fn.codec.encode_result(value)
    except CodecError as err:
        return {"op": "bad", "id": call_id, "error": str(err)}
    if len(text) > limit:
        return {
            "op": "bad",
            "id": call_id,
            "error": f"its result is {len(text)} bytes of JSON, over the node's {limit}",
        }
    return {"op": "done", "id": call_id, "value": text}


async def _serve(functions: dict[str, Function[Any, Any]], in_fd: int, limit: int) -> None:
    global _current
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def reader() -> None:
        while True:
            try:
                message = read_frame(in_fd)
            except Exception:
                message = None
            loop.call_soon_threadsafe(inbox.put_nowait, message)
            if message is None:
                return

    threading.Thread(target=reader, name="shoal-worker-reader", daemon=True).start()
    running: asyncio.Task[dict[str, Any]] | None = None
    while True:
        message = await inbox.get()
        if message is None:
            return  # the node closed the pipe: it is done with this worker
        op = message.get("op")
        if op == "cancel":
            if running is not None and message.get("id") == _current:
                running.cancel()
            continue
        if op != "call" or running is not None:
            continue
        fn = functions.get(str(message.get("name")))
        if fn is None:
            send({"op": "bad", "id": message.get("id"), "error": "no such function here"})
            continue
        _current = message.get("id")
        running = asyncio.create_task(_call(fn, message, limit))
        running.add_done_callback(lambda _: inbox.put_nowait({"op": "_finished"}))
        while running is not None:
            # Until it ends, only cancels matter (the node sends one call at a time).
            message = await inbox.get()
            if message is None:
                return
            if message.get("op") == "cancel" and message.get("id") == _current:
                running.cancel()
            elif message.get("op") == "_finished":
                try:
                    reply = running.result()
                except asyncio.CancelledError:
                    reply = {"op": "cancelled", "id": _current}
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                send(reply)
                _current = None
                running = None


def main() -> None:
    global _out_fd
    limit = int(os.environ.get("SHOAL_WORKER_MAX_RESULT", str(1 << 20)))
    in_fd, _out_fd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # stray writes to fd 1 go to the node's stderr, not into the frames
    sys.stdout = _OutputFrames(1)
    sys.stderr = _OutputFrames(2)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, force=True)
    _progress.set_sink(_progress_frame)
    functions, errors = _load(sys.argv[1:])
    send({"op": "hello", "functions": sorted(functions), "errors": errors, "pid": os.getpid()})
    asyncio.run(_serve(functions, in_fd, limit))


if __name__ == "__main__":
    main()
