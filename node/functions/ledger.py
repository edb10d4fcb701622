"""A worker's ledger: memory it shares with its node, where it notes the call it is running and
keeps the answers it has not sent yet (it sends them in batches), so that a node whose worker
died knows which call it died in and has the answers of the calls it ran before.

The worker writes it without a system call; the node reads the answers only once the worker
has ended (no writer is left then: nothing is read half written), and the running call also
while it runs (to stop that call, and no other, when it is cancelled). Whatever a worker wrote
there is read as any frame from it is: a hostile function can say no more in it than on its
pipe (and the node believes the call it names only if it is the first not answered).

    offset  size
    0       8      the id of the call running now (0: none)
    8       4      how many bytes of answers follow
    12      ...    the answers held, as frames
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile

__all__ = ["SIZE", "Ledger", "create", "read", "running"]

_RUNNING, _HELD = struct.Struct(">Q"), struct.Struct(">I")
_HEAD = struct.Struct(">QI")
SIZE = _HEAD.size + (1 << 16)
"""Bytes of a ledger: answers held beyond what fits are sent at once."""


def create() -> int:
    """A new ledger's descriptor, for a worker to inherit (close-on-exec)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("shoal-worker-ledger", os.MFD_CLOEXEC)
    else:  # not Linux: an unnamed file
        with tempfile.TemporaryFile() as file:
            fd = os.dup(file.fileno())
    try:
        os.ftruncate(fd, SIZE)
    except OSError:
        os.close(fd)
        raise
    return fd


def running(fd: int) -> int:
    """The call a live worker runs now, as its ledger says (0: none): a value written whole
    (aligned), so read whole; by the time it is used the worker may have moved on."""
    data = os.pread(fd, _RUNNING.size, 0)
    return _RUNNING.unpack(data)[0] if len(data) == _RUNNING.size else 0


def read(fd: int) -> tuple[int, bytes]:
    """What an ended worker left in its ledger: the call it ran when it ended (0: none) and
    the answers it held."""
    data = os.pread(fd, SIZE, 0)
    if len(data) < _HEAD.size:
        return 0, b""
    running, held = _HEAD.unpack_from(data)
    return running, data[_HEAD.size : _HEAD.size + min(held, SIZE - _HEAD.size)]


class Ledger:
    """The worker's side: note the running call, and hold answers until they are sent."""

    def __init__(self, fd: int) -> None:
        self._map = mmap.mmap(fd, SIZE)
        os.close(fd)
        self.held = 0  # bytes of answers held

    def running(self, call_id: int) -> None:
        """`call_id` runs from now (0: none does)."""
        _RUNNING.pack_into(self._map, 0, call_id)

    def hold(self, frame: bytes) -> bool:
        """Keep `frame` with the answers held; False when there is no room for it."""
        end = _HEAD.size + self.held + len(frame)
        if end > SIZE:
            return False
        self._map[end - len(frame) : end] = frame
        self.held += len(frame)
        _HELD.pack_into(self._map, _RUNNING.size, self.held)
        return True

    def answers(self) -> bytes:
        """The answers held (still held until `clear`: a worker that dies after it sent them
        has them sent and held, and the node takes the first answer of a call only)."""
        return self._map[_HEAD.size : _HEAD.size + self.held]

    def clear(self) -> None:
        self.held = 0
        _HELD.pack_into(self._map, _RUNNING.size, 0)
