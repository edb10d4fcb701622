"""A task's output as bytes and as text: the wire carries text, and the exact bytes beside it
only where they are not UTF-8 (`OutputChunk.raw`, `TaskResult.stdout_raw`/`stderr_raw`).

On a node, output is held as text decoded with `surrogateescape`, so that every byte survives
redaction, caps and tails; it is split into text and bytes when it goes on the wire.
"""

from __future__ import annotations

from typing import Literal

from shoal.v1 import task_pb2

__all__ = [
    "chunk_bytes",
    "escaped_text",
    "output_chunk",
    "output_size",
    "result_text",
    "set_result_text",
    "stderr_bytes",
    "stdout_bytes",
    "wire_forms",
]

Stream = Literal["stdout", "stderr"]


def stdout_bytes(result: task_pb2.TaskResult) -> bytes:
    """The stdout tail of a result exactly as the task wrote it."""
    return result.stdout_raw or result.stdout.encode()


def stderr_bytes(result: task_pb2.TaskResult) -> bytes:
    """The stderr tail of a result exactly as the task wrote it."""
    return result.stderr_raw or result.stderr.encode()


def chunk_bytes(chunk: task_pb2.OutputChunk) -> bytes:
    """An output chunk exactly as the task wrote it."""
    return chunk.raw or chunk.data.encode()


def output_size(chunk: task_pb2.OutputChunk) -> int:
    """What an output chunk weighs in memory bounds: its text and, if any, its bytes."""
    return len(chunk.data) + len(chunk.raw)


def wire_forms(text: str) -> tuple[str, bytes]:
    """Text decoded with `surrogateescape` as the wire carries it: valid text, and its exact
    bytes when they are not UTF-8 (else b"")."""
    if text.isascii():  # O(1), and most output
        return text, b""
    try:
        text.encode()
    except UnicodeEncodeError:
        try:
            raw = text.encode(errors="surrogateescape")
        except UnicodeEncodeError:  # a lone surrogate that no decoding made: not output
            raw = text.encode(errors="replace")
        return raw.decode(errors="replace"), raw
    return text, b""


def escaped_text(text: str, raw: bytes) -> str:
    """The inverse of `wire_forms`."""
    return raw.decode(errors="surrogateescape") if raw else text


def output_chunk(stream: int, text: str) -> task_pb2.OutputChunk:
    """A chunk of `stream` holding `text` (decoded with `surrogateescape`)."""
    data, raw = wire_forms(text)
    return task_pb2.OutputChunk(stream=stream, data=data, raw=raw)  # type: ignore[arg-type]


def result_text(result: task_pb2.TaskResult, stream: Stream) -> str:
    """A result's stdout or stderr as text decoded with `surrogateescape`."""
    return escaped_text(getattr(result, stream), getattr(result, f"{stream}_raw"))


def set_result_text(result: task_pb2.TaskResult, stream: Stream, text: str) -> None:
    """Set a result's stdout or stderr from text decoded with `surrogateescape`."""
    data, raw = wire_forms(text)
    setattr(result, stream, data)
    setattr(result, f"{stream}_raw", raw)
