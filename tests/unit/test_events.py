"""The event log: global order even when durable events commit late; bounded memory."""

from __future__ import annotations

import asyncio

from shoal.coordinator.events import EPOCH_SHIFT, Change, EventLog
from shoal.v1 import task_pb2


def ev(task: str) -> Change:
    return Change(task)


def seen(log: EventLog, after: int) -> list[str]:
    held = log.after(after)
    assert held is not None
    return [e.task_id if e is not None else "-" for e in held]


def test_numbers_carry_the_epoch() -> None:
    log = EventLog(3)
    assert log.first_seq == (3 << EPOCH_SHIFT) + 1
    log.emit(ev("a"))
    assert log.last_seq == log.first_seq


def test_a_pending_durable_event_holds_back_later_ones() -> None:
    log = EventLog(1)
    start = log.first_seq - 1
    durable = ev("durable")
    durable.seq = log.reserve()
    log.emit(ev("live"))
    assert seen(log, start) == []  # "live" waits behind the uncommitted one
    log.publish([durable])
    assert seen(log, start) == ["durable", "live"]


def test_abandoned_numbers_leave_a_gap_not_a_stall() -> None:
    log = EventLog(1)
    start = log.first_seq - 1
    lost = log.reserve()
    log.emit(ev("after"))
    log.abandon([lost])
    assert seen(log, start) == ["-", "after"]


def test_ring_is_bounded_and_reports_what_it_no_longer_holds() -> None:
    log = EventLog(1, capacity=10)
    for i in range(100):
        log.emit(ev(str(i)))
    assert log.last_seq - log.oldest_seq + 1 <= 20
    assert log.after(log.first_seq) is None
    tail = log.after(log.last_seq - 2)
    assert tail is not None and [e.task_id for e in tail if e] == ["98", "99"]


async def test_wait_after_wakes_on_publish() -> None:
    log = EventLog(1)
    cursor = log.last_seq
    waiter = asyncio.create_task(log.wait_after(cursor))
    await asyncio.sleep(0)
    assert not waiter.done()
    log.emit(ev("x"))
    await asyncio.wait_for(waiter, 1)


def test_a_change_becomes_the_event_watchers_see() -> None:
    result = task_pb2.TaskResult(exit_code=3, stdout="out")
    change = Change(
        "t1",
        task_pb2.TASK_STATE_FAILED,
        node_id="n1",
        tenant="acme",
        principal="n1",
        epoch=2,
        number=1,
        result=result,
        time_ns=1_500_000_000,
    )
    log = EventLog(1)
    log.emit(change)
    event = change.event()
    assert event.seq == log.last_seq
    assert (event.task_id, event.state, event.node_id, event.tenant, event.principal) == (
        "t1",
        task_pb2.TASK_STATE_FAILED,
        "n1",
        "acme",
        "n1",
    )
    assert (event.attempt.epoch, event.attempt.number) == (2, 1)
    assert event.result == result and not event.HasField("output")
    assert event.time.ToNanoseconds() == 1_500_000_000
    assert change.event() is event  # built once
    notice = task_pb2.Event(quota=task_pb2.QuotaNotice(key="k", limited=True))
    wrapped = Change.of(notice)
    log.emit(wrapped)
    assert wrapped.event() is notice and notice.seq == log.last_seq


def out(task: str, size: int) -> Change:
    return Change(task, output=task_pb2.OutputChunk(data="o" * size))


def test_output_held_is_bounded_in_bytes_oldest_first() -> None:
    log = EventLog(1, max_bytes=1000)
    for i in range(50):
        log.emit(out(str(i), 100), size=100)
    assert log.bytes <= 1000
    held = log.after(log.oldest_seq - 1)
    assert held is not None
    assert sum(len(c.output.data) for c in held if c and c.output) == log.bytes
    assert [c.task_id for c in held if c][-1] == "49"  # the newest are kept
    assert log.after(log.first_seq) is None


async def test_on_forgotten_calls_back_once_a_position_leaves_the_log() -> None:
    log = EventLog(1, max_bytes=1000)
    log.emit(out("a", 10), size=10)
    cursor = log.last_seq
    called: list[str] = []
    log.on_forgotten(cursor, lambda: called.append("kept"))
    stop = log.on_forgotten(cursor, lambda: called.append("stopped"))
    stop()
    log.emit(out("b", 10), size=10)  # a drop of nothing: still held
    await asyncio.sleep(0)
    assert called == []
    for i in range(20):
        log.emit(out(str(i), 100), size=100)
        await asyncio.sleep(0)  # each drop calls back soon: armed again until it is gone
    assert called == ["kept"]
    assert log.after(cursor) is None
    log.on_forgotten(cursor, lambda: called.append("at once"))
    assert called == ["kept", "at once"]
    # Stopped while its call back was on its way: it does not come.
    held = log.last_seq
    late = log.on_forgotten(held, lambda: called.append("late"))
    for i in range(20):
        log.emit(out(str(i), 100), size=100)
    late()
    await asyncio.sleep(0)
    assert called[-1] == "at once"
    closing = EventLog(1)
    closing.on_forgotten(closing.last_seq, lambda: called.append("closed"))
    closing.close()
    await asyncio.sleep(0)
    assert called[-1] == "closed"
