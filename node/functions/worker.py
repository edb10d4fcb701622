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


def _arguments(fn: Function[Any, Any], message: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    return fn.codec.decode_arguments(
        str(message.get("args", "")).encode(),
        str(message.get("kwargs", "")).encode(),
        {str(k): str(v) for k, v in dict(message.get("upstream") or {}).items()},
    )


def _raised(call_id: Any, err: BaseException) -> dict[str, Any]:
    return {
        "op": "raised",
        "id": call_id,
        "type": f"{type(err).__module__}.{type(err).__qualname__}",
        "message": str(err)[:10_000],
        "traceback": "".join(traceback.format_exception(err))[-100_000:],
    }


def _returned(fn: Function[Any, Any], call_id: Any, value: Any, limit: int) -> dict[str, Any]:
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


def _call_sync(fn: Function[Any, Any], message: dict[str, Any], limit: int) -> dict[str, Any]:
    """A sync function runs in the main thread: the node kills the worker to cancel it."""
    call_id = message["id"]
    try:
        args, kwargs = _arguments(fn, message)
    except CodecError as err:
        return {"op": "bad", "id": call_id, "error": str(err)}
    try:
        value = fn.fn(*args, **kwargs)
    except (Exception, SystemExit, KeyboardInterrupt) as err:
        return _raised(call_id, err)
    return _returned(fn, call_id, value, limit)


async def _call_async(
    fn: Function[Any, Any], message: dict[str, Any], limit: int
) -> dict[str, Any]:
    call_id = message["id"]
    try:
        args, kwargs = _arguments(fn, message)
    except CodecError as err:
        return {"op": "bad", "id": call_id, "error": str(err)}
    try:
        value = await fn.fn(*args, **kwargs)
    except asyncio.CancelledError:
        return {"op": "cancelled", "id": call_id}
    except (Exception, SystemExit, KeyboardInterrupt) as err:
        return _raised(call_id, err)
    return _returned(fn, call_id, value, limit)


def _run_async(
    loop: asyncio.AbstractEventLoop,
    fn: Function[Any, Any],
    message: dict[str, Any],
    in_fd: int,
    limit: int,
) -> tuple[dict[str, Any], bool]:
    """Run an async call on the worker's loop; a cancel frame (or the node going away)
    cancels it. Returns the reply and whether the node is still there."""
    task = loop.create_task(_call_async(fn, message, limit))
    node_there = True

    def readable() -> None:
        nonlocal node_there
        try:
            frame = read_frame(in_fd)  # the node writes each (small) frame at once
        except Exception:
            frame = None
        if frame is None:
            node_there = False
            loop.remove_reader(in_fd)
            task.cancel()
        elif frame.get("op") == "cancel" and frame.get("id") == message["id"]:
            task.cancel()

    loop.add_reader(in_fd, readable)
    try:
        reply = loop.run_until_complete(task)
    except asyncio.CancelledError:
        reply = {"op": "cancelled", "id": message["id"]}
    finally:
        loop.remove_reader(in_fd)
    return reply, node_there


def _serve(functions: dict[str, Function[Any, Any]], in_fd: int, limit: int) -> None:
    global _current
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    while True:
        message = read_frame(in_fd)
        if message is None:
            return  # the node closed the pipe: it is done with this worker
        if message.get("op") != "call":
            continue  # a cancel for a call that has ended
        fn = functions.get(str(message.get("name")))
        if fn is None:
            send({"op": "bad", "id": message.get("id"), "error": "no such function here"})
            continue
        _current = message.get("id")
        node_there = True
        if inspect.iscoroutinefunction(fn.fn):
            reply, node_there = _run_async(loop, fn, message, in_fd, limit)
        else:
            reply = _call_sync(fn, message, limit)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        send(reply)
        _current = None
        if not node_there:
            return


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
    send(
        {
            "op": "hello",
            "functions": sorted(functions),
            "async": sorted(n for n, f in functions.items() if inspect.iscoroutinefunction(f.fn)),
            "errors": errors,
        }
    )
    _serve(functions, in_fd, limit)


if __name__ == "__main__":
    main()
