"""Frames between the node and a function worker: a 4-byte big-endian length, then JSON."""

from __future__ import annotations

import asyncio
import os
import struct
from typing import Any

from shoal import _json

__all__ = [
    "LENGTH",
    "MAX_FRAME",
    "FrameReader",
    "WireError",
    "async_read_frames",
    "decode_frame",
    "encode_frame",
    "write_all",
]

MAX_FRAME = 32 << 20
"""The largest frame either side accepts: a call's spec is at most a few MiB, a result 1 MiB."""

LENGTH = struct.Struct(">I")


class WireError(Exception):
    """The other side broke the protocol (a frame too large, or not a JSON object)."""


def encode_frame(message: dict[str, Any]) -> bytes:
    body = _json.dumps(message)
    return LENGTH.pack(len(body)) + body


def decode_frame(body: bytes | bytearray) -> dict[str, Any]:
    try:
        message = _json.loads(body)
    except (ValueError, RecursionError) as err:
        raise WireError(f"a frame is not JSON: {err}") from None
    if not isinstance(message, dict):
        raise WireError("a frame is not a JSON object")
    return message


class FrameReader:
    """Whole frames out of a byte stream read in chunks of any size: `feed` what was read, then
    take the `frames` it completed."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def frames(self) -> list[dict[str, Any]]:
        """The whole frames fed so far, in order; WireError when one breaks the protocol."""
        out: list[dict[str, Any]] = []
        buf, at, end = self._buf, 0, len(self._buf)
        while end - at >= LENGTH.size:
            (size,) = LENGTH.unpack_from(buf, at)
            if size > MAX_FRAME:
                raise WireError(f"a frame of {size} bytes (the most is {MAX_FRAME})")
            start = at + LENGTH.size
            if end - start < size:
                break
            out.append(decode_frame(buf[start : start + size]))
            at = start + size
        del buf[:at]
        return out


async def async_read_frames(
    reader: asyncio.StreamReader, frames: FrameReader
) -> list[dict[str, Any]] | None:
    """The next whole frames (all that came in one read); None at end of stream. WireError
    when one breaks the protocol."""
    while not (out := frames.frames()):
        data = await reader.read(1 << 16)
        if not data:
            return None
        frames.feed(data)
    return out


def write_all(fd: int, data: bytes) -> None:
    """Blocking write of all of `data`."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
