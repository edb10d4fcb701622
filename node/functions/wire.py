"""Frames between the node and a function worker: a 4-byte big-endian length, then JSON."""

from __future__ import annotations

import asyncio
import json
import os
import struct
from typing import Any

__all__ = [
    "LENGTH",
    "MAX_FRAME",
    "WireError",
    "async_read_frame",
    "decode_frame",
    "encode_frame",
    "read_frame",
    "write_all",
]

MAX_FRAME = 32 << 20
"""The largest frame either side accepts: a call's spec is at most a few MiB, a result 1 MiB."""

LENGTH = struct.Struct(">I")


class WireError(Exception):
    """The other side broke the protocol (a frame too large, or not a JSON object)."""


# One encoder for every frame: json.dumps with options builds a new one each time.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def encode_frame(message: dict[str, Any]) -> bytes:
    body = _ENCODER.encode(message).encode(errors="surrogateescape")
    return LENGTH.pack(len(body)) + body


def decode_frame(body: bytes) -> dict[str, Any]:
    try:
        message = json.loads(body)
    except (ValueError, RecursionError) as err:
        raise WireError(f"a frame is not JSON: {err}") from None
    if not isinstance(message, dict):
        raise WireError("a frame is not a JSON object")
    return message


async def async_read_frame(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next frame, or None at end of stream; WireError when it breaks the protocol."""
    try:
        (size,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
    except asyncio.IncompleteReadError:
        return None
    if size > MAX_FRAME:
        raise WireError(f"a frame of {size} bytes (the most is {MAX_FRAME})")
    try:
        return decode_frame(await reader.readexactly(size))
    except asyncio.IncompleteReadError:
        return None


def _read_exactly(fd: int, size: int) -> bytes | None:
    parts: list[bytes] = []
    while size:
        data = os.read(fd, min(size, 1 << 20))
        if not data:
            return None
        parts.append(data)
        size -= len(data)
    return b"".join(parts)


def read_frame(fd: int) -> dict[str, Any] | None:
    """Blocking read_frame from a file descriptor (the worker's side)."""
    head = _read_exactly(fd, LENGTH.size)
    if head is None:
        return None
    (size,) = LENGTH.unpack(head)
    if size > MAX_FRAME:
        raise WireError(f"a frame of {size} bytes (the most is {MAX_FRAME})")
    body = _read_exactly(fd, size)
    return None if body is None else decode_frame(body)


def write_all(fd: int, data: bytes) -> None:
    """Blocking write of all of `data`."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
