"""The SSE feed: one watch's batches handed to every member, from the cursor each joined at."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
import weakref
from collections.abc import AsyncIterator

import pytest

from shoal.coordinator.http.feed import RECENT_CHARS, Feed, Feeds
from shoal.v1 import task_pb2


class Sink:
    def __init__(self) -> None:
        self.got: list[tuple[int, str]] = []
        self.error: BaseException | None = None
        self.unsent: int | None = None

    def put(self, cursor: int, events: str) -> None:
        self.got.append((cursor, events))

    def fail(self, error: BaseException) -> None:
        self.error = error

    def seqs(self) -> list[int]:
        return [int(s) for _, text in self.got for s in text.split(",") if s]


class Watch:
    """A watch fed by the test: (cursor, events) as pushed, the starting cursor first."""

    def __init__(self, start: int) -> None:
        self.queue: asyncio.Queue[tuple[int, list[task_pb2.Event]] | BaseException] = (
            asyncio.Queue()
        )
        self.queue.put_nowait((start, []))
        self.last = start

    def push(self, *seqs: int) -> None:
        self.last = max(self.last, *seqs)
        self.queue.put_nowait((self.last, [task_pb2.Event(seq=s) for s in seqs]))

    async def batches(self) -> AsyncIterator[tuple[int, list[task_pb2.Event]]]:
        while True:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item


async def settled() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def make(watch: Watch, *, forgotten_below: int = 0) -> tuple[Feed, list[Feed]]:
    ended: list[Feed] = []
    feed = Feed(
        watch.batches(),
        lambda e: str(e.seq),
        behind=lambda cursor: cursor + 1 < forgotten_below,
        cut=lambda: RuntimeError("fell behind"),
        ended=ended.append,
    )
    await feed.ready.wait()
    return feed, ended


async def test_members_get_each_batch_from_where_they_joined() -> None:
    watch = Watch(10)
    feed, _ = await make(watch)
    first, ahead, behind, too_far = Sink(), Sink(), Sink(), Sink()
    assert feed.join(first, None)
    watch.push(11, 12)
    watch.push(13)
    await settled()
    assert feed.join(behind, 11)  # from the recent batches: what came after 11
    assert feed.join(ahead, 14)  # ahead of the feed: nothing up to 14
    assert not feed.join(too_far, 9)  # before the feed started: not held
    watch.push(14, 15)
    await settled()
    assert first.got[0] == (10, "") and first.seqs() == [11, 12, 13, 14, 15]
    assert behind.got[0] == (11, "") and behind.seqs() == [12, 13, 14, 15]
    assert ahead.got[0] == (14, "") and ahead.seqs() == [15]
    assert too_far.got == []


async def test_a_member_behind_the_log_is_cut_alone_and_the_last_to_leave_ends_it() -> None:
    watch = Watch(0)
    feed, ended = await make(watch, forgotten_below=5)
    slow, quick = Sink(), Sink()
    assert feed.join(slow, None) and feed.join(quick, None)
    slow.unsent = 3  # it holds events after 3 unsent: the log has dropped 4
    watch.push(6)
    await settled()
    assert isinstance(slow.error, RuntimeError) and quick.error is None
    assert quick.seqs() == [6] and slow.seqs() == []
    feed.leave(quick)
    await settled()
    assert not feed.live and ended == [feed]


async def test_a_failing_watch_fails_every_member_and_a_new_feed_starts() -> None:
    watch = Watch(0)
    feeds = Feeds()

    def start(ended: object) -> Feed:
        return Feed(
            watch.batches(),
            lambda e: str(e.seq),
            behind=lambda cursor: False,
            cut=lambda: RuntimeError("cut"),
            ended=ended,  # type: ignore[arg-type]
        )

    feed = feeds.get("key", start)
    await feed.ready.wait()
    assert feeds.get("key", start) is feed
    member = Sink()
    assert feed.join(member, None)
    watch.queue.put_nowait(PermissionError("revoked"))
    await settled()
    assert isinstance(member.error, PermissionError) and not feed.live
    assert len(feeds) == 0
    watch.queue.put_nowait((0, []))
    again = feeds.get("key", start)
    assert again is not feed
    await again.ready.wait()
    again.leave(Sink())  # it has no member: it ends
    await settled()
    assert not again.live and len(feeds) == 0


@pytest.mark.parametrize("end", ["last member leaves", "watch fails"])
async def test_an_ended_feed_is_freed_without_the_cyclic_collector(end: str) -> None:
    """A feed that ended is freed as soon as nothing refers to it: no cycle through its task's
    CancelledError or its failure's traceback keeps it (and its recent batches) until a full
    collection, which a coordinator runs seldom."""
    watch = Watch(0)
    feed, ended = await make(watch)
    member = Sink()
    assert feed.join(member, None)
    watch.push(1, 2)
    await settled()
    gc.disable()
    try:
        if end == "watch fails":
            watch.queue.put_nowait(PermissionError("revoked"))
        else:
            feed.leave(member)
        await settled()
        assert ended == [feed] and not feed.live
        gone = weakref.ref(feed)
        del feed
        ended.clear()
        assert gone() is None
    finally:
        gc.enable()


async def test_a_feed_keeps_its_recent_events_once() -> None:
    """What a feed keeps of its last batches (for subscribers that join behind it) is bounded
    by RECENT_CHARS, each event's text held once."""
    watch = Watch(0)

    def encode(event: task_pb2.Event) -> str:
        return str(event.seq).ljust(16 << 10, "x")  # a text of its own, held by the feed alone

    tracemalloc.start()
    try:
        feed = Feed(
            watch.batches(),
            encode,
            behind=lambda cursor: False,
            cut=lambda: RuntimeError("cut"),
            ended=lambda f: None,
        )
        await feed.ready.wait()
        before, _ = tracemalloc.get_traced_memory()
        for first in range(1, 1024, 8):  # 16 MB in batches of 128 kB
            watch.push(*range(first, first + 8))
        await settled()
        assert watch.queue.empty()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert RECENT_CHARS * 0.9 < held < RECENT_CHARS * 1.25, held
    feed.leave(Sink())
    await settled()
