"""The node's outbox: a Started update rides along with the next update (or goes within
RIDE_ALONG), and so does a result said to be followed by others (with the Started updates held);
anything else is due at once; RIDE_ALONG_MOST results riding along go at once."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from shoal.node.outbox import MAX_BATCH_BYTES, RIDE_ALONG, RIDE_ALONG_MOST, Outbox
from shoal.v1 import node_pb2, task_pb2

pytestmark = pytest.mark.timeout(30)


def _started(task_id: str) -> node_pb2.TaskUpdate:
    return node_pb2.TaskUpdate(task_id=task_id, started=node_pb2.Started())


def _finished(task_id: str) -> node_pb2.TaskUpdate:
    return node_pb2.TaskUpdate(
        task_id=task_id, finished=node_pb2.Finished(state=task_pb2.TASK_STATE_SUCCEEDED)
    )


async def test_started_waits_for_company_a_while() -> None:
    outbox = Outbox()
    assert outbox.due_at == math.inf
    before = time.monotonic()
    outbox.push(_started("a"))
    assert before < outbox.due_at <= time.monotonic() + RIDE_ALONG
    outbox.push(_finished("a"))
    assert outbox.due_at <= time.monotonic()
    batch, _ = outbox.take()
    assert [u.WhichOneof("update") for u in batch] == ["started", "finished"]
    assert outbox.due_at == math.inf


async def test_a_later_started_does_not_hold_an_earlier_one_longer() -> None:
    outbox = Outbox()
    outbox.push(_started("a"))
    first = outbox.due_at
    outbox.push(_started("b"))
    assert outbox.due_at == first


async def test_what_is_sent_again_is_due_at_once() -> None:
    outbox = Outbox()
    outbox.push(_started("a"))
    batch, output = outbox.take()
    outbox.put_back(batch, output)
    assert outbox.due_at <= time.monotonic()


async def test_a_result_followed_by_others_waits_for_them_a_moment_at_most() -> None:
    outbox = Outbox()
    before = time.monotonic()
    outbox.push(_finished("a"), more_follow=True)
    due = outbox.due_at
    assert before < due <= time.monotonic() + RIDE_ALONG
    outbox.push(_finished("b"), more_follow=True)
    outbox.push(_started("c"))  # neither moves it
    assert outbox.due_at == due
    outbox.push(_finished("d"))  # the last of them: all go now, in one batch
    assert outbox.due_at <= time.monotonic()
    batch, _ = outbox.take()
    assert [u.task_id for u in batch] == ["a", "b", "c", "d"]
    outbox.push(_started("e"))  # a new batch: a Started alone rides along again
    assert outbox.due_at <= time.monotonic() + RIDE_ALONG


async def test_results_followed_by_others_go_once_ride_along_most_wait() -> None:
    # The coordinator starts on them while the rest of a long turn of calls runs.
    outbox = Outbox()
    for i in range(RIDE_ALONG_MOST - 1):
        outbox.push(_finished(str(i)), more_follow=True)
    assert outbox.due_at > time.monotonic()
    outbox.push(_finished("last"), more_follow=True)
    assert outbox.due_at <= time.monotonic()
    batch, _ = outbox.take()
    assert len(batch) == RIDE_ALONG_MOST
    outbox.push(_finished("next"), more_follow=True)  # the next part waits again
    assert outbox.due_at > time.monotonic()


async def test_started_updates_held_wait_with_a_followed_result() -> None:
    outbox = Outbox()
    outbox.push(_started("a"))
    outbox.push(_started("b"))
    riding = outbox.due_at
    pushed = time.monotonic()
    outbox.push(_finished("a"), more_follow=True)  # "b" most likely ends with it
    assert riding < outbox.due_at and pushed < outbox.due_at <= time.monotonic() + RIDE_ALONG


async def test_the_writer_is_woken_when_updates_come_due_and_not_before() -> None:
    # A Started update held for company arms a timer rather than waking the writer to wait
    # again (a turn of calls would cost it a wake-up each); a result due now wakes it at once;
    # and once what was held is taken, nothing is due and no timer is left to wake it.
    outbox = Outbox()
    outbox.push(_started("a"))
    assert not outbox.ready.is_set()
    await asyncio.wait_for(outbox.ready.wait(), 5)  # due at last, not never
    assert outbox.due_at <= time.monotonic()
    outbox.ready.clear()
    outbox.take()
    outbox.push(_started("b"))
    outbox.push(_finished("b"), more_follow=True)
    assert not outbox.ready.is_set()
    outbox.push(_finished("c"))
    assert outbox.ready.is_set()  # due now
    outbox.ready.clear()
    outbox.take()
    assert outbox.due_at == math.inf and outbox._timer is None


async def test_what_a_full_batch_leaves_goes_next_without_waiting() -> None:
    # A batch is cut at MAX_BATCH_BYTES: the rest is due, and a result said to be followed
    # by others does not make it wait.
    outbox = Outbox()
    big = node_pb2.TaskUpdate(
        task_id="big",
        finished=node_pb2.Finished(
            state=task_pb2.TASK_STATE_SUCCEEDED, result=task_pb2.TaskResult(stdout="x" * (1 << 20))
        ),
    )
    for _ in range(MAX_BATCH_BYTES // big.ByteSize() + 2):
        outbox.push(big)
    batch, _ = outbox.take()
    assert sum(u.ByteSize() for u in batch) <= MAX_BATCH_BYTES
    assert outbox.due_at <= time.monotonic()
    outbox.push(_finished("a"), more_follow=True)
    assert outbox.due_at <= time.monotonic()
    rest, _ = outbox.take()
    assert rest[-1].task_id == "a" and outbox.due_at == math.inf
