"""Frames between the node and a function worker: a fixed header (the length of the rest, the
frame's kind, the call it is about, a number), then bytes whose meaning the kind gives.

    kind        sent by  number          data
    HELLO       worker   -               JSON {"functions": [...], "async": [...], "errors": [...]}
    CALL        node     -               CALL_HEAD (the lengths of the next three), the name,
                                         the args, the kwargs; then the upstream JSON, if any
    CANCEL      node     -               -
    DONE        worker   seconds taken   the result's JSON
    RAISED      worker   seconds taken   JSON {"type": ..., "message": ..., "traceback": ...}
    BAD         worker   seconds taken   why the call could not be made (UTF-8)
    CANCELLED   worker   seconds taken   -
    OUT         worker   1 or 2 (stream) what the call printed (bytes, UTF-8 where it was)
    PROGRESS    worker   fraction        what the call said of its progress (UTF-8)
    RECALL      node     -               -   (give the call back unless it has started)
    DROPPED     worker   -               -   (the call recalled: it will not run here)

A call's arguments and its result are JSON already: they go through as they are, decoded only
by the function's codec, not wrapped in JSON of their own.
"""

from __future__ import annotations

import os
import signal
import struct
from typing import Any, NamedTuple

from shoal import _json

__all__ = [
    "BAD",
    "CALL",
    "CANCEL",
    "CANCELLED",
    "DONE",
    "DROPPED",
    "ENDS",
    "HELLO",
    "MAX_FRAME",
    "OUT",
    "PROGRESS",
    "RAISED",
    "RECALL",
    "WAKE",
    "Frame",
    "FrameReader",
    "WireError",
    "decode_call",
    "encode_call",
    "encode_frame",
    "json_object",
    "write_all",
]

HELLO, CALL, CANCEL, DONE, RAISED, BAD, CANCELLED, OUT, PROGRESS, RECALL, DROPPED = range(11)
ENDS = frozenset({DONE, RAISED, BAD, CANCELLED, DROPPED})
"""The kinds of frame that end a call: the last the worker sends of it."""

MAX_FRAME = 32 << 20
"""The largest frame either side accepts: a call's spec is at most a few MiB, a result 1 MiB."""

WAKE = signal.SIGRTMIN + 1 if hasattr(signal, "SIGRTMIN") else None
"""The signal a node sends a worker amid a sync call, to have it take in the frames sent since
(recalls of the calls queued behind it, a cancel) and send the answers it holds. None where
there is no spare signal (not Linux): the calls queued wait for the slow one there."""

HEAD = struct.Struct(">IBQd")
"""The length of what follows it, the kind, the call's id, the number."""
CALL_HEAD = struct.Struct(">III")
"""A call's data begins with the lengths of its name, args and kwargs."""
_REST = HEAD.size - 4  # of the header, what its length counts
_CALL_START = struct.Struct(HEAD.format + CALL_HEAD.format[1:])  # a CALL frame's two headers


class WireError(Exception):
    """The other side broke the protocol (a frame too large or too short)."""


class Frame(NamedTuple):
    kind: int
    id: int
    number: float = 0.0
    data: bytes = b""


def encode_frame(kind: int, call_id: int, number: float = 0.0, data: bytes = b"") -> bytes:
    return HEAD.pack(_REST + len(data), kind, call_id, number) + data


def encode_call(call_id: int, name: str, args: bytes, kwargs: bytes, upstream: bytes) -> bytes:
    """A CALL frame; `upstream` is empty or the JSON object of the upstream results."""
    raw = name.encode()
    size = _REST + CALL_HEAD.size + len(raw) + len(args) + len(kwargs) + len(upstream)
    head = _CALL_START.pack(size, CALL, call_id, 0.0, len(raw), len(args), len(kwargs))
    return b"".join((head, raw, args, kwargs, upstream))


def decode_call(data: bytes) -> tuple[str, bytes, bytes, bytes]:
    """The name, args, kwargs and upstream JSON of a CALL frame's data; WireError when the
    lengths it gives do not fit it."""
    if len(data) < CALL_HEAD.size:
        raise WireError("a call frame shorter than its header")
    name_size, args_size, kwargs_size = CALL_HEAD.unpack_from(data)
    at = CALL_HEAD.size
    args_at = at + name_size
    kwargs_at = args_at + args_size
    upstream_at = kwargs_at + kwargs_size
    if upstream_at > len(data):
        raise WireError("a call frame shorter than the lengths it gives")
    name = data[at:args_at].decode(errors="replace")
    return name, data[args_at:kwargs_at], data[kwargs_at:upstream_at], data[upstream_at:]


def json_object(data: bytes) -> dict[str, Any] | None:
    """The JSON object that a frame's data holds (a HELLO's, a RAISED's, a call's upstream);
    None when it holds anything else."""
    try:
        value = _json.loads(data)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


class FrameReader:
    """Whole frames out of a byte stream read in chunks of any size: `feed` what was read, then
    take the `frames` it completed. A frame's data is cut from what was read once; a frame
    that comes in many reads grows one buffer until it is whole."""

    def __init__(self) -> None:
        self._buf: bytes | bytearray = b""  # read, not yet made frames
        self._needed = HEAD.size  # bytes the next frame needs: its header, or all of it
        self._broken: WireError | None = None

    def feed(self, data: bytes) -> None:
        if not self._buf:
            self._buf = data  # most reads: whole frames, taken as they are
            return
        if type(self._buf) is bytes:
            self._buf = bytearray(self._buf)
        self._buf += data

    def frames(self) -> list[Frame]:
        """The whole frames fed so far, in order; WireError once those before the first that
        breaks the protocol have been taken."""
        if self._broken is not None:
            raise self._broken
        buf = self._buf
        if len(buf) < self._needed:
            return []
        if type(buf) is bytearray:
            buf = bytes(buf)
        out: list[Frame] = []
        at, end, unpack = 0, len(buf), HEAD.unpack_from
        while end - at >= HEAD.size:
            size, kind, call_id, number = unpack(buf, at)
            if not _REST <= size <= MAX_FRAME:
                self._broken = WireError(f"a frame of {size} bytes (from {_REST} to {MAX_FRAME})")
                if not out:
                    raise self._broken
                break
            stop = at + 4 + size
            if stop > end:
                self._needed = stop - at
                break
            out.append(_frame(Frame, (kind, call_id, number, buf[at + HEAD.size : stop])))
            at = stop
        else:
            self._needed = HEAD.size
        self._buf = buf[at:] if at else buf
        return out


_frame = tuple.__new__  # a Frame made from its fields without NamedTuple's own __new__ (hot)


def write_all(fd: int, data: bytes) -> None:
    """Blocking write of all of `data`."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
