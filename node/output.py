"""A task's streamed output, bounded: so much is passed on, then only each stream's tail."""

from __future__ import annotations

import codecs

from shoal._output import escaped_text, output_chunk
from shoal.node.executors.base import Emit
from shoal.node.executors.process import _Tail
from shoal.v1 import task_pb2

__all__ = ["OutputCap"]

PIECE = 64 << 10
"""The largest chunk passed on: an executor's bigger chunks are split."""


def _size(text: str) -> int:
    """Bytes of `text`, decoded with surrogateescape (str.isascii is O(1): most output costs
    no encoding)."""
    return len(text) if text.isascii() else len(text.encode(errors="surrogateescape"))


def _head(text: str, limit: int) -> str:
    """The longest start of `text` within `limit` bytes (not ending inside a character)."""
    if text.isascii():
        return text[:limit]
    decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    return decoder.decode(text.encode(errors="surrogateescape")[:limit])  # holds a cut character


class OutputCap:
    """Passes a task's output chunks on to `emit` until `limit` bytes in all; past that, keeps
    only each stream's last `tail` characters, which `close()` sends after a marker saying how
    much was cut. Called with each chunk, like the `emit` it wraps."""

    def __init__(self, emit: Emit, *, limit: int, tail: int) -> None:
        self._emit = emit
        self._room = limit
        self.limit = limit
        self._tail = tail
        self._cut: dict[int, tuple[int, _Tail]] = {}  # stream -> (bytes cut, its tail)
        self._ends: dict[int, _Tail] = {}  # stream -> its last `tail` characters

    def __call__(self, chunk: task_pb2.OutputChunk) -> None:
        data = escaped_text(chunk.data, chunk.raw)
        end = self._ends.get(chunk.stream)
        if end is None:
            end = self._ends[chunk.stream] = _Tail(self._tail)
        end.add(data)
        size = len(chunk.raw) if chunk.raw else _size(data)
        if size <= self._room and size <= PIECE:  # the common case: passed on as it is
            self._room -= size
            self._emit(chunk)
            return
        stream = chunk.stream
        if self._room:
            head = _head(data, min(self._room, size))
            self._room -= _size(head)
            for i in range(0, len(head), PIECE):
                self._emit(output_chunk(stream, head[i : i + PIECE]))
            data = data[len(head) :]
            size = _size(data)
        if not data:
            return
        cut, tail = self._cut.get(stream) or (0, _Tail(self._tail))
        tail.add(data)
        self._cut[stream] = (cut + size, tail)

    def end_of(self, stream: int) -> str:
        """The last `tail` characters the task wrote on `stream`: its result's, when it was
        stopped (timed out, cancelled) before its executor made one."""
        end = self._ends.get(stream)
        return end.text() if end is not None else ""

    def close(self) -> None:
        """Say what was cut, and pass on each cut stream's tail (call once, when it ended)."""
        for stream, (cut, tail) in sorted(self._cut.items()):
            kept = tail.text()
            marker = (
                f"\n[shoal: {cut - _size(kept)} bytes of output cut here: the node passes on"
                f" {self.limit} bytes of a task's output, then the end of each stream]\n"
            )
            self._emit(task_pb2.OutputChunk(stream=stream, data=marker))  # type: ignore[arg-type]
            for i in range(0, len(kept), PIECE):
                self._emit(output_chunk(stream, kept[i : i + PIECE]))
        self._cut.clear()
