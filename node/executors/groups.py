"""The process groups a task runs in, so that its node can pause and resume them."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator

__all__ = ["ProcessGroups"]


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class ProcessGroups:
    """A task's process groups, each named by its leader's pid (`start_new_session` makes one).

    An executor `add`s each group it starts and `discard`s it once the group is gone. The node
    `pause`s them (SIGSTOP: a group added while paused is stopped at once) and `resume`s them
    (SIGCONT). `on_change` is called whenever `stopped` may have changed.
    """

    def __init__(self, on_change: Callable[[], None] | None = None) -> None:
        self._leaders: set[int] = set()
        self._paused = False
        self._on_change = on_change

    def __iter__(self) -> Iterator[int]:
        return iter(tuple(self._leaders))

    def __len__(self) -> int:
        return len(self._leaders)

    @property
    def paused(self) -> bool:
        """Whether the task is paused: its groups are stopped, and new ones will be."""
        return self._paused

    @property
    def stopped(self) -> bool:
        """Whether the task has processes and they are stopped now."""
        return self._paused and bool(self._leaders)

    def add(self, pgid: int) -> None:
        """A group the task started (its leader's pid); stopped at once while paused."""
        self._leaders.add(pgid)
        if self._paused:  # only then can `stopped` change
            _signal_group(pgid, signal.SIGSTOP)
            self._changed()

    def discard(self, pgid: int) -> None:
        """The group is gone (its processes ended or were killed)."""
        if pgid in self._leaders:
            self._leaders.discard(pgid)
            if self._paused:
                self._changed()

    def pause(self) -> None:
        """Stop every group (SIGSTOP) until `resume`."""
        if not self._paused:
            self._paused = True
            for pgid in self:
                _signal_group(pgid, signal.SIGSTOP)
            self._changed()

    def resume(self) -> None:
        """Let every group run again (SIGCONT)."""
        if self._paused:
            self._paused = False
            for pgid in self:
                _signal_group(pgid, signal.SIGCONT)
            self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()
