"""Where a run's progress goes: its coordinator session, or the caller that ran it directly."""

from __future__ import annotations

from typing import Protocol

from shoal.node.executors.base import Outcome
from shoal.v1 import task_pb2

__all__ = ["RunReport"]


class RunReport(Protocol):
    """Told of a run's progress in order: `started` (unless it fails before), any `output`,
    then exactly one of `finished` and `released`."""

    def started(self) -> None:
        """Its executor is about to run it."""

    def output(self, chunk: task_pb2.OutputChunk) -> None:
        """A chunk of its output, redacted."""

    def finished(self, outcome: Outcome) -> None:
        """It ended: its outcome."""

    def released(self, why: str, outcome: Outcome) -> None:
        """It was stopped from outside (the node drains, or its lease ended) and is to run
        elsewhere: `outcome` is how it stopped here, not an outcome of the task."""
