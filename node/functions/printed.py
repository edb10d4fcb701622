"""What a function worker's calls print and say of their progress, as frames to the node.

`install` makes sys.stdout and sys.stderr send what the running call (`begin` .. `end`) writes
as its output: in runs, one frame per run of writes to a stream, sent when the call ends, at
OUT_PIECE characters, or OUT_DELAY after (a thread looks). Progress is sampled as the node
samples it. Every frame the worker writes goes through `send`, after what was printed before.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
import time

from shoal import _progress
from shoal._output import wire_forms
from shoal._progress import Sampler
from shoal.node.functions import wire
from shoal.node.functions.wire import encode_frame, write_all

__all__ = ["OUT_DELAY", "OUT_PIECE", "begin", "end", "install", "send"]

# Re-entrant: a finalizer or signal handler that prints while a frame is being written must
# not deadlock the worker.
_send_lock = threading.RLock()
_out_fd = -1
_current: int | None = None  # the id of the call running now
_sampler: Sampler | None = None  # of the running call's progress reports (the node's rule)
OUT_PIECE = 1 << 18
"""Characters of output in one frame at most (a MiB of UTF-8 at most, well under MAX_FRAME)."""


def send(data: bytes) -> None:
    """Write frames now, after what was printed before them."""
    with _send_lock:
        _printed.take_and_write(data)


class _Printed:
    """What calls printed and has yet to go, in the order written: sent when its call ends,
    when it holds OUT_PIECE characters, or within OUT_DELAY (a thread looks), so that a call
    printing a line at a time costs the node a frame per batch of lines, not one per write,
    and is still followed live."""

    def __init__(self) -> None:
        self._runs: list[tuple[int, int, list[str]]] = []  # (call, stream, texts)
        self._size = 0  # characters held
        self.held = threading.Event()  # set while something is held

    def add(self, call_id: int, stream: int, text: str) -> None:
        with _send_lock:
            runs = self._runs
            if runs and runs[-1][0] == call_id and runs[-1][1] == stream:
                runs[-1][2].append(text)
            else:
                if not runs:
                    self.held.set()
                runs.append((call_id, stream, [text]))
            self._size += len(text)
            if self._size >= OUT_PIECE:
                self.take_and_write(b"")

    def flush(self) -> None:
        if self._runs:
            send(b"")

    def take_and_write(self, data: bytes) -> None:
        """Write what is held, then `data` (under _send_lock)."""
        frames = []
        if self._runs:
            runs, self._runs, self._size = self._runs, [], 0
            self.held.clear()
            for call_id, stream, texts in runs:
                text = "".join(texts)
                for at in range(0, len(text), OUT_PIECE):  # each piece fits a frame
                    # Bytes that os.fsdecode made text go back as bytes.
                    piece, raw = wire_forms(text[at : at + OUT_PIECE])
                    frames.append(encode_frame(wire.OUT, call_id, stream, raw or piece.encode()))
        if frames or data:
            write_all(_out_fd, b"".join((*frames, data)))


_printed = _Printed()
OUT_DELAY = 0.05
"""Seconds what a call prints may wait for what it prints next."""


def _flush_printed_now_and_then() -> None:
    """Send what was printed OUT_DELAY after it was (asleep while nothing is held)."""
    while True:
        _printed.held.wait()
        time.sleep(OUT_DELAY)
        with contextlib.suppress(OSError):  # the node is gone: the worker ends with it
            _printed.flush()


def _start_flusher() -> None:
    threading.Thread(target=_flush_printed_now_and_then, name="shoal-output", daemon=True).start()


def _forked() -> None:
    """In a child a call forked: its own lock and flusher; what its parent held is the parent's."""
    global _send_lock, _printed
    _send_lock, _printed = threading.RLock(), _Printed()
    _start_flusher()


class _OutputFrames(io.TextIOBase):
    """sys.stdout / sys.stderr: each write goes to the node as the running call's output."""

    def __init__(self, stream: int) -> None:
        self._stream = stream

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        call_id = _current
        if call_id is not None and text:
            _printed.add(call_id, self._stream, text)
        return len(text)


def _progress_frame(fraction: float, message: str) -> None:
    global _sampler
    call_id = _current
    if call_id is None:
        return
    if _sampler is None:
        _sampler = Sampler()
    if _sampler.passes(fraction, time.monotonic()):
        data = message[:1000].encode(errors="replace")
        send(encode_frame(wire.PROGRESS, call_id, fraction, data))


def _flush_replaced_streams() -> None:
    """Flush sys.stdout and sys.stderr if the call replaced them (ours need no flush), so
    that what it wrote goes out as this call's output."""
    if type(sys.stdout) is _OutputFrames and type(sys.stderr) is _OutputFrames:
        return  # most calls
    for stream in (sys.stdout, sys.stderr):
        if not isinstance(stream, _OutputFrames):
            with contextlib.suppress(Exception):
                stream.flush()


def install(fd: int) -> None:
    """Write frames to `fd`; sys.stdout and sys.stderr become the running call's output."""
    global _out_fd
    _out_fd = fd
    sys.stdout = _OutputFrames(1)
    sys.stderr = _OutputFrames(2)
    _start_flusher()
    os.register_at_fork(after_in_child=_forked)
    _progress.set_sink(_progress_frame)


def begin(call_id: int) -> None:
    """What is printed and reported from now is call `call_id`'s."""
    global _current, _sampler
    _current, _sampler = call_id, None


def end() -> None:
    """The call has returned: what it printed goes now (before its answer)."""
    global _current
    _flush_replaced_streams()
    _printed.flush()
    _current = None
