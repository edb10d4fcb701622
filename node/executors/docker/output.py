"""A container's output streams: read in threads, emitted on the loop, redacted."""

from __future__ import annotations

import asyncio
import codecs
import threading

import requests
from docker.errors import DockerException
from docker.models.containers import Container

from shoal._output import output_chunk
from shoal.node.executors.base import ExecutionContext
from shoal.node.executors.docker.engine import EngineError, in_thread, post
from shoal.node.executors.process import _Tail

__all__ = ["ContainerOutput", "follow"]

_HELD_BYTES = 1 << 20  # output a reader may get ahead of the loop before it waits


class ContainerOutput:
    """One output stream of a container: bytes from its reader thread, decoded, redacted,
    emitted and kept on the loop.

    What arrives while the loop is busy is emitted as one chunk (a container logs line by
    line: a chunk per line would flood the node), and a reader that gets `_HELD_BYTES` ahead
    of the loop waits for it.
    """

    def __init__(self, stream: int, ctx: ExecutionContext) -> None:
        self.stream = stream
        self.ctx = ctx
        self.tail = _Tail(ctx.output_tail_bytes)
        self.closed = False
        self._loop = asyncio.get_running_loop()
        # Bytes that are not UTF-8 stay bytes (as lone surrogates) through to the wire.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self._redactor = ctx.redactor.stream()
        self._lock = threading.Lock()
        self._held: list[bytes] = []  # arrived, not yet taken by the loop
        self._held_bytes = 0
        self._taken = threading.Event()

    def push(self, data: bytes) -> None:
        """From the reader thread: more of the stream."""
        with self._lock:
            self._held.append(data)
            self._held_bytes += len(data)
            first = len(self._held) == 1
        if first:
            post(self._loop, self._take)
        while self._held_bytes > _HELD_BYTES and not self.closed and not self._loop.is_closed():
            self._taken.wait(0.1)
            self._taken.clear()

    def _take(self) -> None:
        with self._lock:
            held, self._held, self._held_bytes = self._held, [], 0
        self._taken.set()
        if held and not self.closed:
            self._emit(self._redactor.feed(self._decoder.decode(b"".join(held))))

    def close(self) -> None:
        """The stream ended: emit what was held back. Nothing is taken after this."""
        if not self.closed:
            self._take()
            self._emit(self._redactor.feed(self._decoder.decode(b"", final=True)))
            self._emit(self._redactor.flush())
            self.abandon()

    def abandon(self) -> None:
        """The run ended early (cancelled, failed): what still arrives is dropped."""
        self.closed = True
        self._taken.set()  # a reader waiting for room goes on, to its end

    def _emit(self, text: str) -> None:
        if text:
            self.tail.add(text)  # redacted already, so the result's tail is too
            self.ctx.emit(output_chunk(self.stream, text))


def follow(container: Container, output: ContainerOutput, *, stdout: bool) -> asyncio.Future[None]:
    """Follow one of the container's log streams until it ends (the container stopped)."""

    def read() -> None:
        try:
            logs = container.logs(stream=True, follow=True, stdout=stdout, stderr=not stdout)
            try:
                for data in logs:
                    output.push(data)
            finally:
                logs.close()
        except (DockerException, requests.RequestException):
            raise
        except Exception as err:  # the raw stream's own (urllib3, socket) errors
            raise EngineError(f"reading the container's output: {err}") from err

    which = "stdout" if stdout else "stderr"
    return in_thread(f"shoal-docker-{which}-{container.short_id}", read)
