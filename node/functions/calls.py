"""A call as a function worker holds it, and how it runs to its reply: the function's value
as JSON, what it raised (with the function's own frames of its traceback), or why it could not
be made. Whatever a call raises is its outcome, never the end of the worker."""

from __future__ import annotations

import asyncio
import functools
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import Any

from shoal import _json
from shoal._codec import CodecError
from shoal._function import Function
from shoal.node.functions import wire
from shoal.node.functions.wire import Frame

__all__ = ["Call", "Reply", "call_async", "call_sync"]


class Call:
    """A call the node sent: its id, its function's name and arguments as JSON."""

    __slots__ = ("args", "id", "kwargs", "name", "upstream")

    def __init__(self, frame: Frame) -> None:
        self.id = frame.id
        self.name, self.args, self.kwargs, self.upstream = wire.decode_call(frame.data)


Reply = tuple[int, bytes]
"""How a call ended: the kind of its last frame, and its data."""


def _arguments(fn: Function[Any, Any], call: Call) -> tuple[list[Any], dict[str, Any]]:
    upstream: dict[str, str] = {}
    if call.upstream:
        given = wire.json_object(call.upstream)
        if given is None:
            raise CodecError("upstream results are not a JSON object")
        upstream = {str(k): str(v) for k, v in given.items()}
    return fn.codec.decode_arguments(call.args, call.kwargs, upstream)


def _bad(why: str) -> Reply:
    return wire.BAD, why.encode(errors="replace")


def _theirs(err: BaseException) -> TracebackType | None:
    """The traceback of `err` from the function's own frames (the worker's passed over)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return tb or err.__traceback__


def _raised(err: BaseException) -> Reply:
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


def _returned(fn: Function[Any, Any], value: Any, limit: int) -> Reply:
    try:
        data = fn.codec.encode_result(value)
    except CodecError as err:
        return _bad(str(err))
    except BaseException as err:  # the value's own code (a serializer) raised
        return _raised(err)
    if len(data) > limit:
        return _bad(f"its result is {len(data):,} bytes of JSON, over the limit of {limit:,}")
    return wire.DONE, data


def _bound(fn: Function[Any, Any], call: Call) -> Callable[[], Any] | Reply:
    """`fn` with the call's arguments, to call; or the reply when they do not decode (a
    validator of the function's types that raises is the call's outcome too)."""
    try:
        args, kwargs = _arguments(fn, call)
    except CodecError as err:
        return _bad(str(err))
    except BaseException as err:
        return _raised(err)
    return functools.partial(fn.fn, *args, **kwargs)


def call_sync(fn: Function[Any, Any], call: Call, limit: int) -> Reply:
    """A sync function runs in the main thread: the node kills the worker to cancel it.
    Whatever the call raises is its outcome, never the end of the worker."""
    bound = _bound(fn, call)
    if isinstance(bound, tuple):
        return bound
    try:
        value = bound()
    except BaseException as err:  # SystemExit and the like: the call's own
        return _raised(err)
    return _returned(fn, value, limit)


async def call_async(fn: Function[Any, Any], call: Call, limit: int) -> Reply:
    bound = _bound(fn, call)
    if isinstance(bound, tuple):
        return bound
    try:
        value = await bound()
    except asyncio.CancelledError:
        return wire.CANCELLED, b""
    except BaseException as err:  # SystemExit and the like: the call's own
        return _raised(err)
    return _returned(fn, value, limit)
