"""What a function worker's calls print and say of their progress, as frames to the node.

`install` makes sys.stdout and sys.stderr send what the running call (`begin` .. `end`) writes
as its output: in runs, one frame per run of writes to a stream, sent when the call ends, at
OUT_PIECE characters, or OUT_DELAY after (a thread looks). Fd 1 and 2 become pipes the worker
reads (`capture_descriptors`): what subprocesses and C code write there during a call is its
output too, in order with what it prints; between calls it goes to the node's stderr.
Progress is sampled as the node samples it. Every frame the worker writes goes through
`send`, after what was printed before.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import os
import select
import sys
import threading
import time
from collections.abc import Iterator

from shoal import _progress
from shoal._output import wire_forms
from shoal._progress import Sampler
from shoal.node.functions import wire
from shoal.node.functions.wire import encode_frame, write_all

__all__ = [
    "OUT_DELAY",
    "OUT_PIECE",
    "begin",
    "busy",
    "capture_descriptors",
    "end",
    "install",
    "replaced",
    "send",
    "tampered",
    "to_node",
]

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
    with _send_lock, _holding():
        _printed.take_and_write(data)


_busy = 0  # > 0 while output is held or written, by any thread (changed under _send_lock)


@contextlib.contextmanager
def _holding() -> Iterator[None]:
    global _busy
    _busy += 1
    try:
        yield
    finally:
        _busy -= 1


def busy() -> bool:
    """Whether output is being held or written now: a signal handler that interrupted it
    must not send frames of its own (they would cut into a frame, or jump over output)."""
    return _busy > 0


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
        with _send_lock, _holding():
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
    """In a child a call forked: its own lock and flusher; what its parent held is the parent's,
    and so are the pipes of fd 1 and 2 (what the child writes there the parent reads)."""
    global _send_lock, _printed, _descriptors
    _send_lock, _printed, _descriptors = threading.RLock(), _Printed(), None
    _start_flusher()


class _OutputFrames(io.TextIOBase):
    """sys.stdout / sys.stderr: each write goes to the node as the running call's output.
    Its `fileno()` and `buffer` are the descriptor beneath (1 or 2), read as the same."""

    def __init__(self, stream: int) -> None:
        self._stream = stream

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    @property
    def buffer(self) -> io.BufferedWriter:
        global _buffered
        _buffered = True  # flushed before what is printed next, and at the call's end
        return _buffers[self._stream]

    def fileno(self) -> int:
        return self._stream

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        call_id = _current
        if call_id is not None and text:
            if _descriptors is not None:
                _descriptors.drain(waits=_PRINT_WAITS)  # what a command wrote goes first
            _printed.add(call_id, self._stream, text)
        return len(text)


class _Descriptors:
    """Fd 1 and 2 as pipes this process reads (a thread, as they fill; and `drain` before a
    call's print and at its end): what is written there is the running call's output, or
    the node's stderr's between calls."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waited = select.poll()  # by the thread (one poll object is not for two threads)
        self._looked = select.poll()  # by `drain`, under the lock
        self._cut = False  # whether a decoder holds the start of a character
        self._streams: dict[int, tuple[int, codecs.IncrementalDecoder]] = {}  # fd -> stream
        for stream in (1, 2):
            read, write = os.pipe()
            os.set_blocking(read, False)
            os.dup2(write, stream)
            os.close(write)
            self._waited.register(read, select.POLLIN)
            self._looked.register(read, select.POLLIN)
            self._streams[read] = (stream, codecs.getincrementaldecoder("utf-8")("surrogateescape"))

    def drain(self, *, ended: bool = False, waits: float = -1) -> None:
        """Take what is in the pipes now (`ended`: and the end of a character cut short),
        once the thread has passed on what it read, waiting at most `waits` seconds for it
        (-1: as long as it takes): a print in a signal handler that came while a frame was
        being written must not wait for ever on the thread, which waits for that frame."""
        if _buffered:
            for buffer in _buffers.values():
                buffer.flush()  # not under the lock: a full pipe waits on the thread
        if not self._lock.acquire(timeout=waits):
            return
        try:
            if self._looked.poll(0):
                for fd in list(self._streams):
                    self._read(fd, once=False)  # one at its end: the thread lets it go
            if ended and self._cut:
                self._cut = False
                for stream, decoder in self._streams.values():
                    if text := decoder.decode(b"", final=True):
                        self._pass_on(stream, text)
        finally:
            self._lock.release()

    def follow(self) -> None:
        """Read the pipes as they fill (a thread: a subprocess printing more than a pipe holds
        must not wait for the call to end). A pipe no one can write to any more (a call closed
        fd 1 or 2, and so did every process it started) is let go."""
        while self._streams:
            ready = self._waited.poll()
            with self._lock:
                for fd, _ in ready:
                    if fd in self._streams and not self._read(fd, once=True):
                        self._waited.unregister(fd)
                        self._looked.unregister(fd)
                        del self._streams[fd]

    def _read(self, fd: int, *, once: bool) -> bool:
        """Pass on what the pipe `fd` holds (one read's worth `once`, else all); False once it
        is at its end."""
        stream, decoder = self._streams[fd]
        while True:
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                return False
            if text := decoder.decode(data):
                self._pass_on(stream, text)
            self._cut = self._cut or bool(decoder.getstate()[0])  # a character cut short
            if once:
                return True

    def _pass_on(self, stream: int, text: str) -> None:
        call_id = _current
        if call_id is None:
            to_node(text)
            return
        with contextlib.suppress(OSError):  # the node is gone: the worker ends with it
            _printed.add(call_id, stream, text)


_descriptors: _Descriptors | None = None
_node_stderr = 2  # the node's stderr (fd 2 until `capture_descriptors` takes fd 2 over)
_PRINT_WAITS = 0.1  # seconds a print waits for what a command wrote before it to be taken
_buffers: dict[int, io.BufferedWriter] = {}  # sys.stdout.buffer and sys.stderr.buffer
_buffered = False  # whether either was ever taken (most workers: never)


def to_node(text: str) -> None:
    """Write `text` to the node's stderr (its log), whatever call runs."""
    with contextlib.suppress(OSError):
        write_all(_node_stderr, text.encode(errors="surrogateescape"))


def capture_descriptors() -> None:
    """Make fd 1 and 2 pipes whose writes are the running call's output (`install` first)."""
    global _descriptors, _node_stderr
    _node_stderr = os.dup(2)  # before fd 2 becomes a pipe
    _descriptors = _Descriptors()
    for stream in (1, 2):
        _buffers[stream] = io.BufferedWriter(io.FileIO(stream, "wb", closefd=False))
        _pipes[stream] = _identity(stream)
    threading.Thread(target=_descriptors.follow, name="shoal-descriptors", daemon=True).start()


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


_pipes: dict[int, tuple[int, int] | None] = {}  # fd 1 and 2 as captured: (device, inode)


def _identity(fd: int) -> tuple[int, int] | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def replaced() -> bool:
    """Whether a call left sys.stdout or sys.stderr replaced."""
    return type(sys.stdout) is not _OutputFrames or type(sys.stderr) is not _OutputFrames


def tampered() -> str:
    """Which of fd 1 and 2 a call left no longer the pipe this process reads ('' if none):
    a system call each."""
    for fd, pipe in _pipes.items():
        if _identity(fd) != pipe:
            return f"fd {fd} closed or replaced"
    return ""


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
    if _descriptors is not None:
        _descriptors.drain(ended=True)
    _printed.flush()
    _current = None
