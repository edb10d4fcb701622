"""The lock that gives one process a data dir: two coordinators on one store would record
every task twice, each in its own epoch."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from shoal.errors import FailedPrecondition

__all__ = ["DirLock"]


class DirLock:
    """An exclusive flock on a lock file: held from `acquire` until `release` or the process
    ends (even by kill -9), never by a child process; the file holds the holder's pid."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise FailedPrecondition naming the process that holds it."""
        if self._fd is not None:
            return
        # Not inherited (Python's default): a task a node runs must not keep the lock.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            who = f"pid {holder}" if holder.isdigit() else "another process"
            raise FailedPrecondition(
                f"{self.path.parent} is in use by {who} (it holds {self.path.name}):"
                " stop it first, or give this one another data dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Let the lock go; idempotent. The file stays: removing it would race a new holder."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)
