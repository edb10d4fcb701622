"""The chaos checker on hand-made histories: each kind of anomaly is caught, and only those."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shoal.auth import COORDINATOR
from shoal.v1 import task_pb2
from tests.chaos.ledger import Ledger, LedgerLine, check

SUCCEEDED = task_pb2.TASK_STATE_SUCCEEDED
FAILED = task_pb2.TASK_STATE_FAILED
QUEUED = task_pb2.TASK_STATE_QUEUED
RUNNING = task_pb2.TASK_STATE_RUNNING
CANCELLED = task_pb2.TASK_STATE_CANCELLED


def task(
    task_id: str, state: int, epoch: int = 1, number: int = 1, earlier: int = 0
) -> task_pb2.Task:
    out = task_pb2.Task(id=task_id, state=state)  # type: ignore[arg-type]
    if number:
        out.attempt.epoch, out.attempt.number = epoch, number
    for _ in range(earlier):
        out.attempts.add(state=FAILED)
    return out


def event(seq: int, task_id: str, state: int, principal: str = "admin") -> task_pb2.Event:
    return task_pb2.Event(seq=seq, task_id=task_id, state=state, principal=principal)  # type: ignore[arg-type]


def ran(
    task_id: str,
    *,
    node: str = "node-a",
    epoch: int = 1,
    number: int = 1,
    state: str = "SUCCEEDED",
    fenced: bool = False,
    t: float = 1.0,
) -> list[LedgerLine]:
    """A start and a finish line of one attempt."""
    return [
        LedgerLine(t, node, "start", task_id, epoch, number),
        LedgerLine(t + 0.5, node, "finish", task_id, epoch, number, state, fenced),
    ]


def test_a_clean_history_is_safe_and_counts_recoveries() -> None:
    tasks = {"a": task("a", SUCCEEDED), "b": task("b", SUCCEEDED, epoch=2, number=1)}
    events = [
        event(1, "a", QUEUED),
        event(2, "b", QUEUED),
        event(3, "a", SUCCEEDED),
        event(3, "a", SUCCEEDED),  # the same event, seen live and replayed
        event(9, "b", SUCCEEDED),
    ]
    # b's first attempt (epoch 1) was cut by a coordinator restart: started, never finished.
    lines = [*ran("a"), LedgerLine(1.0, "node-b", "start", "b", 1, 1), *ran("b", epoch=2)]

    report = check(
        "clean", acknowledged=["a", "b"], tasks=tasks, events=events, ledger=Ledger(lines)
    )

    assert report.safe, report.problems()
    assert report.recovered == 1
    assert report.line() == (
        "chaos clean: acknowledged=2 lost=0 duplicated=0 unexpected=0 recovered=1"
    )


def test_lost_tasks_are_named_with_the_reason() -> None:
    tasks = {"gone": None, "stuck": task("stuck", RUNNING), "silent": task("silent", SUCCEEDED)}
    events = [event(1, "stuck", QUEUED)]
    ledger = Ledger([*ran("silent")])

    report = check("lost", acknowledged=list(tasks), tasks=tasks, events=events, ledger=ledger)

    assert report.lost == {
        "gone": "unknown to the coordinator",
        "stuck": "never final: RUNNING",
        "silent": "SUCCEEDED but no final event",
    }
    assert not report.duplicated


def test_two_final_events_for_one_task_are_a_duplicate() -> None:
    tasks = {"a": task("a", SUCCEEDED)}
    events = [event(3, "a", SUCCEEDED), event(7, "a", SUCCEEDED)]

    report = check("dup", acknowledged=["a"], tasks=tasks, events=events, ledger=Ledger(ran("a")))

    assert list(report.duplicated) == ["a"]
    assert "2 final events" in report.duplicated["a"]


@pytest.mark.parametrize(
    ("lines", "why"),
    [
        ([], "which no node's ledger finished"),
        (ran("a", number=2), "which no node's ledger finished"),  # another attempt finished
        (ran("a", fenced=True), "node-a:SUCCEEDED fenced"),  # a fenced result was recorded
        (ran("a", state="FAILED"), "node-a:FAILED"),  # not what the node finished with
    ],
)
def test_a_result_no_node_produced_is_a_duplicate(lines: list[LedgerLine], why: str) -> None:
    tasks = {"a": task("a", SUCCEEDED)}

    report = check(
        "stale",
        acknowledged=["a"],
        tasks=tasks,
        events=[event(3, "a", SUCCEEDED)],
        ledger=Ledger(lines),
    )

    assert why in report.duplicated["a"]


def test_results_the_coordinator_made_need_no_ledger_line() -> None:
    tasks = {
        "lost-node": task("lost-node", FAILED),  # its node died; retries exhausted
        "never-ran": task("never-ran", CANCELLED, number=0),
    }
    events = [event(4, "lost-node", FAILED, COORDINATOR), event(5, "never-ran", CANCELLED)]

    report = check("made", acknowledged=list(tasks), tasks=tasks, events=events, ledger=Ledger())

    assert report.safe, report.problems()


def test_ledger_lines_of_unacknowledged_tasks_are_unexpected() -> None:
    tasks = {"a": task("a", SUCCEEDED)}
    ledger = Ledger([*ran("a"), *ran("phantom")])

    report = check(
        "x", acknowledged=["a"], tasks=tasks, events=[event(2, "a", SUCCEEDED)], ledger=ledger
    )

    assert report.unexpected == {"phantom"}
    assert "unexpected=1" in report.line()


def test_recovered_counts_earlier_attempts_the_coordinator_kept() -> None:
    tasks = {"a": task("a", SUCCEEDED, number=2, earlier=1)}

    report = check(
        "x",
        acknowledged=["a"],
        tasks=tasks,
        events=[event(2, "a", SUCCEEDED)],
        ledger=Ledger(ran("a", number=2)),
    )

    assert report.recovered == 1


def test_reading_ledgers_skips_only_a_torn_last_line(tmp_path: Path) -> None:
    good = {"t": 2.0, "node": "n", "event": "start", "task": "a", "epoch": 1, "number": 1}
    finish = {**good, "t": 1.0, "event": "finish", "state": "FAILED", "fenced": True}
    whole = tmp_path / "whole.jsonl"
    whole.write_text(json.dumps(good) + "\n")
    torn = tmp_path / "torn.jsonl"
    torn.write_text(json.dumps(finish) + "\n" + json.dumps(good)[:20])

    ledger = Ledger.read([whole, torn, tmp_path / "missing.jsonl"])

    assert ledger.torn == 1
    assert [(line.event, line.t, line.fenced) for line in ledger.lines] == [
        ("finish", 1.0, True),
        ("start", 2.0, False),
    ]
    assert ledger.select(event="finish", attempt=(1, 1))[0].state == "FAILED"

    broken = tmp_path / "broken.jsonl"
    broken.write_text("not json\n" + json.dumps(good) + "\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl:1"):
        Ledger.read([broken])
