"""The chaos checker: what nodes ran (their ledgers) against what the coordinator recorded.

Each node started with a `ledger` setting appends one JSON line per attempt event:

    {"t": 1763800000.1, "node": "node-a", "event": "start", "task": "9f..", "epoch": 3,
     "number": 1}
    {"t": ..., "event": "finish", ..., "state": "SUCCEEDED", "fenced": false}

`check` reads those ledgers with the coordinator's final Task protos and its events, and says
which acknowledged tasks were lost, which were recorded more than once (or recorded with a
result no node produced), which tasks nodes ran that nobody acknowledged, and how many
recovered after a failed attempt. Execution is at-least-once, so two nodes may both finish
a task; only what the coordinator *records* must be exactly once.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shoal.auth import COORDINATOR
from shoal.specs import is_final, state_name
from shoal.v1 import task_pb2

__all__ = ["Ledger", "LedgerLine", "Report", "check", "final_events"]

Attempt = tuple[int, int]
"""(coordinator epoch, attempt number): what fences an attempt."""


@dataclass(frozen=True)
class LedgerLine:
    """One event a node recorded about one attempt of one task."""

    t: float  # the node's wall clock (time.time()), seconds
    node: str
    event: str  # "start" or "finish"
    task: str
    epoch: int
    number: int
    state: str = ""  # finish only: SUCCEEDED, FAILED, CANCELLED or TIMED_OUT
    fenced: bool = False  # finish only: the node stopped it itself, having lost its lease

    @property
    def attempt(self) -> Attempt:
        return (self.epoch, self.number)

    @classmethod
    def parse(cls, text: str) -> LedgerLine:
        """One ledger line; ValueError (KeyError, TypeError included) when it is not one."""
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError(f"not an object: {text!r}")
        return cls(
            t=float(raw["t"]),
            node=str(raw["node"]),
            event=str(raw["event"]),
            task=str(raw["task"]),
            epoch=int(raw["epoch"]),
            number=int(raw["number"]),
            state=str(raw.get("state", "")),
            fenced=bool(raw.get("fenced", False)),
        )


@dataclass
class Ledger:
    """Every node's ledger lines, in time order."""

    lines: list[LedgerLine] = field(default_factory=list)
    torn: int = 0  # last lines cut short by a kill -9, skipped

    @classmethod
    def read(cls, paths: Iterable[Path]) -> Ledger:
        """Read ledger files (a missing one is a node that recorded nothing).

        Only a file's last line may be torn (a node killed mid-write); a bad line anywhere
        else is a broken ledger and raises ValueError naming it.
        """
        ledger = cls()
        for path in paths:
            try:
                text = path.read_text()
            except FileNotFoundError:
                continue
            rows = text.split("\n")
            for i, row in enumerate(rows):
                if not row.strip():
                    continue
                try:
                    ledger.lines.append(LedgerLine.parse(row))
                except (ValueError, KeyError, TypeError) as err:
                    if i == len(rows) - 1:  # no newline after it: the write was cut short
                        ledger.torn += 1
                        continue
                    raise ValueError(f"{path}:{i + 1}: not a ledger line: {err}") from err
        ledger.lines.sort(key=lambda line: line.t)
        return ledger

    def select(
        self,
        *,
        event: str | None = None,
        node: str | None = None,
        task: str | None = None,
        attempt: Attempt | None = None,
    ) -> list[LedgerLine]:
        """The lines that match every filter given, in time order."""
        return [
            line
            for line in self.lines
            if (event is None or line.event == event)
            and (node is None or line.node == node)
            and (task is None or line.task == task)
            and (attempt is None or line.attempt == attempt)
        ]

    def attempts_of(self, task: str) -> set[Attempt]:
        return {line.attempt for line in self.lines if line.task == task}


def final_events(events: Iterable[task_pb2.Event]) -> dict[str, dict[int, task_pb2.Event]]:
    """Per task, its final events by sequence number (one event seen twice counts once)."""
    out: dict[str, dict[int, task_pb2.Event]] = defaultdict(dict)
    for event in events:
        if event.task_id and not event.HasField("output") and is_final(event.state):
            out[event.task_id][event.seq] = event
    return out


@dataclass
class Report:
    """What one scenario showed: its safety counts and its own figures."""

    scenario: str
    acknowledged: int
    lost: dict[str, str] = field(default_factory=dict)  # task id -> why
    duplicated: dict[str, str] = field(default_factory=dict)  # task id -> why
    unexpected: set[str] = field(default_factory=set)  # task ids nobody acknowledged
    recovered: int = 0
    figures: dict[str, str] = field(default_factory=dict)

    @property
    def safe(self) -> bool:
        return not (self.lost or self.duplicated or self.unexpected)

    def line(self) -> str:
        """`chaos <scenario>: acknowledged=N lost=0 duplicated=0 unexpected=0 recovered=K ...`"""
        counts = (
            f"acknowledged={self.acknowledged} lost={len(self.lost)}"
            f" duplicated={len(self.duplicated)} unexpected={len(self.unexpected)}"
            f" recovered={self.recovered}"
        )
        extra = "".join(f" {k}={v}" for k, v in self.figures.items())
        return f"chaos {self.scenario}: {counts}{extra}"

    def problems(self, limit: int = 10) -> str:
        """The first few lost, duplicated and unexpected tasks with the reason of each."""
        out = [f"lost {i}: {why}" for i, why in list(self.lost.items())[:limit]]
        out += [f"duplicated {i}: {why}" for i, why in list(self.duplicated.items())[:limit]]
        out += [f"unexpected {i}" for i in sorted(self.unexpected)[:limit]]
        return "\n".join(out)


def check(
    scenario: str,
    *,
    acknowledged: Collection[str],
    tasks: Mapping[str, task_pb2.Task | None],
    events: Iterable[task_pb2.Event],
    ledger: Ledger,
) -> Report:
    """Compare what was acknowledged, what the coordinator recorded and what nodes ran.

    `tasks` maps each acknowledged id to the coordinator's Task (None: it does not know it);
    `events` are the coordinator's events, replayed from the start (duplicates by seq are
    fine). Lost: acknowledged but unknown, not final, or without a final event. Duplicated:
    more than one final event, or a recorded result whose attempt no node finished (as
    recorded, unfenced) — results the coordinator made itself (a lost node's, a cancel in
    the queue) and tasks never dispatched are exempt. Unexpected: ledger lines of tasks
    nobody acknowledged. Recovered: succeeded after more than one attempt.
    """
    acked = set(acknowledged)
    report = Report(scenario, len(acked))
    finals = final_events(events)
    for task_id in sorted(acked):
        task = tasks.get(task_id)
        recorded = finals.get(task_id, {})
        if task is None:
            report.lost[task_id] = "unknown to the coordinator"
            continue
        if not is_final(task.state):
            report.lost[task_id] = f"never final: {state_name(task.state)}"
            continue
        if not recorded:
            report.lost[task_id] = f"{state_name(task.state)} but no final event"
            continue
        if len(recorded) > 1:
            seqs = ", ".join(
                f"{seq} {state_name(e.state)} by {e.principal}"
                for seq, e in sorted(recorded.items())
            )
            report.duplicated[task_id] = f"{len(recorded)} final events: {seqs}"
            continue
        (event,) = recorded.values()
        why = _unmatched_result(task, event, ledger)
        if why:
            report.duplicated[task_id] = why
            continue
        ran = ledger.attempts_of(task_id)
        if (
            task.state == task_pb2.TASK_STATE_SUCCEEDED
            and max(len(ran), len(task.attempts) + 1) > 1
        ):
            report.recovered += 1
    report.unexpected = {line.task for line in ledger.lines} - acked
    return report


def _unmatched_result(task: task_pb2.Task, event: task_pb2.Event, ledger: Ledger) -> str:
    """Why the recorded result is not one a node produced ('' when it is)."""
    if event.principal == COORDINATOR or not task.attempt.number:
        return ""
    attempt = (task.attempt.epoch, task.attempt.number)
    state = state_name(task.state)
    finished = ledger.select(event="finish", task=task.id, attempt=attempt)
    if not finished:
        return f"{state} recorded for attempt {attempt}, which no node's ledger finished"
    if any(line.state == state and not line.fenced for line in finished):
        return ""
    seen = ", ".join(f"{f.node}:{f.state}{' fenced' if f.fenced else ''}" for f in finished)
    return f"{state} recorded for attempt {attempt}, but its ledger says {seen}"
