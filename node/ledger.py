"""The node's ledger: one JSON line per attempt it starts, finishes or gives back.

Written as things happen (each line flushed to the OS, so it survives the node's own crash),
it is the node's side of the story when one asks what ran where, and how often: the chaos
suite checks the coordinator's records against it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import IO

from shoal.specs import state_name
from shoal.v1 import task_pb2

__all__ = ["Ledger"]


class Ledger:
    """Appends to `path`; a Ledger for None writes nothing."""

    def __init__(self, path: Path | None, node_id: str) -> None:
        self._node = node_id
        self._file: IO[str] | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", encoding="utf-8")

    def write(self, event: str, task_id: str, attempt: task_pb2.AttemptId, **extra: object) -> None:
        if self._file is None:
            return
        line = {
            "t": time.time(),
            "node": self._node,
            "event": event,
            "task": task_id,
            "epoch": attempt.epoch,
            "number": attempt.number,
            **extra,
        }
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()

    def finished(
        self, task_id: str, attempt: task_pb2.AttemptId, state: int, *, fenced: bool
    ) -> None:
        self.write("finish", task_id, attempt, state=state_name(state), fenced=fenced)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
