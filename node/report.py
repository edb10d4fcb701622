"""Where a run's progress goes: its coordinator session, or the caller that ran it directly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from shoal.node.executors.base import Outcome
from shoal.node.ledger import Ledger
from shoal.v1 import node_pb2, task_pb2

__all__ = ["AttemptReport", "Push", "RunReport", "Stop"]


class Push(Protocol):
    """Where updates go (Outbox.push)."""

    def __call__(self, update: node_pb2.TaskUpdate, *, more_follow: bool = False) -> None: ...


class RunReport(Protocol):
    """Told of a run's progress in order: `started` (unless it fails before), any `output`,
    then exactly one of `finished` and `released`."""

    def started(self) -> None:
        """Its executor is about to run it."""

    def output(self, chunk: task_pb2.OutputChunk) -> None:
        """A chunk of its output, redacted."""

    def progress(self, progress: task_pb2.Progress) -> None:
        """What it says of its progress (clamped, sampled)."""

    def finished(self, outcome: Outcome) -> None:
        """It ended: its outcome."""

    def released(self, why: str, outcome: Outcome) -> None:
        """It was stopped from outside (the node drains, or its lease ended) and is to run
        elsewhere: `outcome` is how it stopped here, not an outcome of the task."""


class Stop:
    """Why a run was stopped before it ended by itself."""

    CANCEL = "cancelled"
    FENCE = "stopped by its node: the node's lease ended, so the task runs elsewhere"
    RELEASE = "given back: the node is draining"
    # Direct tasks: there is no coordinator to give them back to.
    DRAIN = "stopped: the node is draining"
    SHUTDOWN = "stopped: the node is shutting down"


@dataclass(frozen=True)
class AttemptReport:
    """The progress of an attempt the coordinator assigned: into the ledger and the outbox."""

    task_id: str
    attempt: task_pb2.AttemptId
    ledger: Ledger
    push: Push

    def _update(self, *, more_follow: bool = False, **kw: Any) -> None:
        update = node_pb2.TaskUpdate(task_id=self.task_id, attempt=self.attempt, **kw)
        self.push(update, more_follow=more_follow)

    def started(self) -> None:
        self.ledger.write("start", self.task_id, self.attempt)
        self._update(started=node_pb2.Started())

    def output(self, chunk: task_pb2.OutputChunk) -> None:
        self._update(output=chunk)

    def progress(self, progress: task_pb2.Progress) -> None:
        self._update(progress=progress)

    def finished(self, outcome: Outcome) -> None:
        self.ledger.finished(self.task_id, self.attempt, outcome.state, fenced=False)
        self._update(
            finished=node_pb2.Finished(state=outcome.state, result=outcome.result),  # type: ignore[arg-type]
            more_follow=outcome.more_follow,
        )

    def released(self, why: str, outcome: Outcome) -> None:
        # Not an outcome: stopped from outside the task. A coordinator that still counts it as
        # running (a fenced node may be wrong about its lease) queues it again.
        if why == Stop.FENCE:
            self.ledger.finished(self.task_id, self.attempt, outcome.state, fenced=True)
        else:
            self.ledger.write("release", self.task_id, self.attempt)
        self._update(released=node_pb2.Released(reason=why))
