"""One Watch shared by the SSE subscribers that ask the same of it as the same caller.

Each batch of events is encoded once and handed to every subscriber of the feed, so that a
dashboard left open costs a list append per batch, not a pass over every event. A subscriber
joins at any cursor from the first the feed still holds in its recent batches onward; one
from further back follows a Watch of its own until it gets there.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass
from typing import Protocol

from shoal.v1 import task_pb2

__all__ = ["Feed", "Feeds", "Sink"]

RECENT_CHARS = 4 << 20
"""Encoded events a feed keeps of its last batches, for subscribers that join a little behind
it (a browser that reconnects)."""


class Sink(Protocol):
    """A subscriber's stream, as a feed sees it."""

    def put(self, cursor: int, events: str) -> None:
        """Take events (JSON objects joined by commas; may be empty) up to `cursor`, to send
        soon; never waits."""

    def fail(self, error: BaseException) -> None:
        """The feed ended, or cut it: its stream ends with `error`."""

    @property
    def unsent(self) -> int | None:
        """The cursor of the oldest events it holds and has yet to send (None: none)."""


@dataclass(frozen=True, slots=True)
class _Batch:
    after: int  # the cursor before it
    cursor: int
    seqs: tuple[int, ...]
    texts: tuple[str, ...]  # kept once: joined only for a member that joins from it
    chars: int

    def since(self, floor: int) -> str:
        """Its events after `floor`."""
        return ",".join(t for s, t in zip(self.seqs, self.texts, strict=True) if s > floor)


class Feed:
    """A Watch's batches (`batches`: its first item gives the starting cursor), encoded with
    `encode` and handed to every member. A member is cut (with the error `cut()` gives) when
    `behind(cursor)` says that the events it has yet to send, from `cursor`, left the event
    log: as a watcher of its own would be, so that what it holds stays bounded."""

    def __init__(
        self,
        batches: AsyncIterator[tuple[int, list[task_pb2.Event]]],
        encode: Callable[[task_pb2.Event], str],
        *,
        behind: Callable[[int], bool],
        cut: Callable[[], BaseException],
        ended: Callable[[Feed], None],
    ) -> None:
        self.cursor = -1  # after the last batch handed out (-1: not started)
        self.ready = asyncio.Event()  # set once it started, or ended
        self.failure: BaseException | None = None
        self._encode = encode
        self._behind = behind
        self._cut = cut
        self._ended = ended
        # Each member, with the feed's cursor when it joined: it is judged only by what the
        # feed handed it since (what it got before is bounded by how it got it).
        self._members: dict[Sink, int] = {}
        self._floors: dict[Sink, int] = {}  # members that joined ahead of the feed
        self._recent: deque[_Batch] = deque()
        self._recent_chars = 0
        self._oldest = -1  # the first cursor a member can join at
        task = asyncio.create_task(self._run(batches), name="shoal-sse-feed")
        task.add_done_callback(self._drop_task)
        self._task: asyncio.Task[None] | None = task

    def _drop_task(self, task: asyncio.Task[None]) -> None:
        # A cancelled task keeps its CancelledError, whose traceback holds _run's frame and so
        # this feed: a cycle that only a full collection would free, with its recent batches.
        self._task = None

    @property
    def live(self) -> bool:
        return self._task is not None and not self._task.done()

    def join(self, sink: Sink, since: int | None) -> bool:
        """Add `sink` from `since` (None: from now), first handing it what it missed of the
        recent batches; False (and nothing done) when the feed ended or no longer holds
        everything after `since`."""
        if not self.live or self.cursor < 0:
            return False
        since = self.cursor if since is None else since
        if since < self._oldest:
            return False
        sink.put(since, "")  # where it starts: its first message says so
        for batch in self._recent:
            if batch.cursor > since:
                sink.put(batch.cursor, batch.since(since))
        if since > self.cursor:
            self._floors[sink] = since
        self._members[sink] = self.cursor
        return True

    def leave(self, sink: Sink) -> None:
        self._members.pop(sink, None)
        self._floors.pop(sink, None)
        if not self._members and self._task is not None:
            self._task.cancel()

    async def _run(self, batches: AsyncIterator[tuple[int, list[task_pb2.Event]]]) -> None:
        try:
            async for cursor, events in batches:
                if self.cursor < 0:
                    self.cursor = self._oldest = cursor
                    self.ready.set()
                    continue
                self._hand_out(cursor, events)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            # Without its traceback, which holds this frame and so this feed (a cycle).
            self.failure = err.with_traceback(None)
            for sink in list(self._members):
                sink.fail(err)
        finally:
            self._members.clear()
            self._recent.clear()
            self.ready.set()
            self._ended(self)
            with contextlib.suppress(Exception):
                await batches.aclose()  # type: ignore[attr-defined]

    def _hand_out(self, cursor: int, events: list[task_pb2.Event]) -> None:
        texts = tuple(self._encode(e) for e in events)
        text = ",".join(texts)  # one string for every member (each holds it until sent)
        batch = _Batch(self.cursor, cursor, tuple(e.seq for e in events), texts, len(text))
        self.cursor = cursor
        self._recent.append(batch)
        self._recent_chars += batch.chars
        while self._recent_chars > RECENT_CHARS and len(self._recent) > 1:
            gone = self._recent.popleft()
            self._recent_chars -= gone.chars
            self._oldest = gone.cursor
        for sink, joined in list(self._members.items()):
            unsent = sink.unsent
            if unsent is not None and self._behind(max(unsent, joined)):
                del self._members[sink]
                self._floors.pop(sink, None)
                sink.fail(self._cut())
                continue
            floor = self._floors.get(sink)
            if floor is None:
                sink.put(cursor, text)
            elif cursor > floor:
                del self._floors[sink]
                sink.put(cursor, batch.since(floor))


class Feeds:
    """The feeds running now, by what they watch and for whom."""

    def __init__(self) -> None:
        self._feeds: dict[Hashable, Feed] = {}

    def get(self, key: Hashable, start: Callable[[Callable[[Feed], None]], Feed]) -> Feed:
        """The live feed of `key`, started (`start(ended)`) when there is none."""
        feed = self._feeds.get(key)
        if feed is None or not feed.live:
            feed = start(lambda f: self._forget(key, f))
            self._feeds[key] = feed
        return feed

    def _forget(self, key: Hashable, feed: Feed) -> None:
        if self._feeds.get(key) is feed:
            del self._feeds[key]

    def __len__(self) -> int:
        return len(self._feeds)
