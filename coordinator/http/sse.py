"""GET /api/events: Tasks.Watch as Server-Sent Events.

Each message's `id:` is the Watch cursor after it and its `data:` the WatchResponse as JSON;
a browser that reconnects sends the last id back (Last-Event-ID) and resumes after it, losing
and repeating nothing. Subscribers that ask the same as the same caller share one watch
(feed.py): each event is encoded once for all of them. A subscriber that reads slower than
events come is cut as a gRPC watcher is (an `error` event, then the stream ends; it
reconnects from its last id): once more than MAX_UNSENT_BYTES of events wait behind a message
its connection is still taking, or the events it missed left the log; one whose connection
takes nothing for STALL_SECONDS is disconnected. A caller has at most MAX_STREAMS_PER_CALLER
streams open, the server MAX_STREAMS: what the streams hold in memory stays bounded.

Events that come within COALESCE_SECONDS of each other go out as one message, so a browser
parses a few messages a second however fast the mesh runs; a message still carries every
event up to its id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from aiohttp import web
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from shoal._gate import acting_as
from shoal.auth import Principal
from shoal.coordinator.http.auth import Caller
from shoal.coordinator.http.errors import error_body, error_response, unexpected_response
from shoal.coordinator.http.feed import Feed, Feeds
from shoal.coordinator.http.limits import StreamSlots
from shoal.coordinator.http.rpc import API_PREFIX, method_path
from shoal.errors import InvalidArgument, ShoalError
from shoal.v1 import task_pb2, tasks_pb2

__all__ = [
    "COALESCE_SECONDS",
    "HEARTBEAT_SECONDS",
    "MAX_STREAMS",
    "MAX_STREAMS_PER_CALLER",
    "MAX_UNSENT_BYTES",
    "STALL_SECONDS",
    "EventJson",
    "events_route",
    "watch_request",
]

HEARTBEAT_SECONDS = 15.0
"""A comment line this often keeps proxies from closing an idle stream, and finds a gone
subscriber."""

_WATCH = tasks_pb2.DESCRIPTOR.services_by_name["Tasks"].methods_by_name["Watch"]
_FIELDS = {
    **{f.name: f for f in tasks_pb2.WatchRequest.DESCRIPTOR.fields},
    **{f.json_name: f for f in tasks_pb2.WatchRequest.DESCRIPTOR.fields},
    "task_id": tasks_pb2.WatchRequest.DESCRIPTOR.fields_by_name["task_ids"],
    "state": tasks_pb2.WatchRequest.DESCRIPTOR.fields_by_name["states"],
    "cursor": tasks_pb2.WatchRequest.DESCRIPTOR.fields_by_name["since"],
}
COALESCE_SECONDS = 0.1
"""Events that come within this long of each other are sent as one message."""
_MAX_PENDING = 1 << 20  # characters of events held for the next message; past it, sent at once
MAX_UNSENT_BYTES = 4 << 20
"""Events a subscriber of a feed may have waiting (JSON, all ASCII: a byte a character) while
its connection takes what was sent before; past it, it is cut as one that fell behind."""
STALL_SECONDS = 10.0
"""A connection that takes no piece of a message (_PIECE bytes) for this long is ended."""
_PIECE = 64 << 10
MAX_STREAMS_PER_CALLER = 16
MAX_STREAMS = 128
"""Event streams open at once, per caller and in all (each holds up to MAX_UNSENT_BYTES, and
its feed up to feed.RECENT_CHARS)."""
_LAST_WORD_SECONDS = 5.0
_TRUE = frozenset({"true", "1", "yes", ""})
_FALSE = frozenset({"false", "0", "no"})


def watch_request(items: Iterable[tuple[str, str]], last_id: str | None) -> tasks_pb2.WatchRequest:
    """The WatchRequest of a query string: its fields by name (`task_ids` or `task_id`,
    repeated or comma-separated; `states` by enum name; `since` or `cursor`), and Last-Event-ID
    over both."""
    data: dict[str, Any] = {}
    for key, value in items:
        field = _FIELDS.get(key)
        if field is None:
            raise InvalidArgument(
                f"unknown parameter {key[:50]!r}: WatchRequest has"
                f" {', '.join(f.name for f in tasks_pb2.WatchRequest.DESCRIPTOR.fields)}"
            )
        if field.is_repeated:
            data.setdefault(field.name, []).extend(v for v in value.split(",") if v)
        elif field.type == FieldDescriptor.TYPE_BOOL:
            if value.lower() not in _TRUE | _FALSE:
                raise InvalidArgument(f"{key} must be true or false")
            data[field.name] = value.lower() in _TRUE
        else:
            data[field.name] = value
    if last_id is not None:
        data["since"] = last_id.strip()
    if "states" in data:  # short names too: ?states=succeeded,failed
        data["states"] = [
            s.upper() if s.upper().startswith("TASK_STATE_") else f"TASK_STATE_{s.upper()}"
            for s in data["states"]
        ]
    try:
        return json_format.ParseDict(data, tasks_pb2.WatchRequest())
    except (json_format.ParseError, ValueError) as err:
        raise InvalidArgument(f"bad events query: {str(err)[:300]}") from None


def _error(body: object) -> bytes:
    return f"event: error\ndata: {json.dumps(body, separators=(',', ':'))}\n\n".encode()


class EventJson:
    """Events as JSON by sequence number, shared by every subscriber: an event is encoded
    once, not once per subscriber (an event's content is the same for every watcher that
    receives it). Bounded in bytes; large events (output) are encoded each time."""

    def __init__(self, *, max_bytes: int = 8 << 20, max_event: int = 16 << 10) -> None:
        self._by_seq: OrderedDict[int, str] = OrderedDict()
        self._bytes = 0
        self._max_bytes = max_bytes
        self._max_event = max_event

    def event(self, event: task_pb2.Event) -> str:
        text = self._by_seq.get(event.seq)
        if text is None:
            text = json.dumps(json_format.MessageToDict(event), separators=(",", ":"))
            if len(text) <= self._max_event:
                self._by_seq[event.seq] = text
                self._bytes += len(text)
                while self._bytes > self._max_bytes:
                    self._bytes -= len(self._by_seq.popitem(last=False)[1])
        return text

    def response(self, response: tasks_pb2.WatchResponse) -> str:
        """The WatchResponse in protobuf's JSON mapping (as MessageToDict would give it)."""
        parts = []
        if response.events:
            parts.append(f'"events":[{",".join(self.event(e) for e in response.events)}]')
        if response.cursor:
            parts.append(f'"cursor":"{response.cursor}"')  # a uint64: a string in JSON
        return "{" + ",".join(parts) + "}"


class _Stream:
    """One subscriber's response: opened at its first message, written one at a time; the
    events that come within COALESCE_SECONDS of each other are sent as one message."""

    def __init__(
        self, request: web.Request, encoded: EventJson, cut: Callable[[], BaseException]
    ) -> None:
        self._request = request
        self._encoded = encoded
        self._cut = cut  # the error of a subscriber cut for falling behind
        self.response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache, no-store",
                "X-Accel-Buffering": "no",  # proxies pass each message on at once
            }
        )
        self._lock = asyncio.Lock()
        self._pending: list[str] = []  # events encoded, not sent yet
        self._pending_size = 0
        self._cursor = 0  # of the last events taken in
        self._sent = -1  # the cursor of the last message sent
        self.unsent: int | None = None  # the cursor before the events pending (None: none)
        self._flusher: asyncio.Task[None] | None = None
        self._flushing = False  # the flusher is sending (not to be cut off mid-message)
        self._closed = False
        self._failure: BaseException | None = None
        self._failed = asyncio.Event()

    @property
    def open(self) -> bool:
        return self.response.prepared

    async def send(self, chunk: bytes) -> None:
        async with self._lock:
            await self._send(chunk)

    async def _send(self, chunk: bytes) -> None:
        """Write `chunk` a piece at a time: a connection that does not take a piece within
        STALL_SECONDS is ended (it was sent what it took; it resumes from its last id)."""
        if not self.response.prepared:
            await self.response.prepare(self._request)
        view = memoryview(chunk)
        try:
            for start in range(0, len(view), _PIECE):
                async with asyncio.timeout(STALL_SECONDS):
                    await self.response.write(view[start : start + _PIECE])
        except TimeoutError:
            self._abort()
            raise self._cut() from None
        except asyncio.CancelledError:
            self._abort()  # a write given up midway leaves a connection that cannot write
            raise

    def _abort(self) -> None:
        """End the connection at once, dropping what it has yet to send."""
        transport = self._request.transport
        if transport is not None:
            transport.abort()

    def put(self, cursor: int, events: str) -> None:
        """Take events (encoded, joined by commas) up to `cursor` in, to be sent soon: with
        those that follow within COALESCE_SECONDS, at once when it is the first message or
        what waits is large. A subscriber whose connection is still taking an earlier message
        while more than MAX_UNSENT_BYTES wait is cut, as one that fell behind (the feed does
        not wait for it)."""
        if self._failure is not None:
            return
        self._take(cursor, events)
        if self._lock.locked() and self._pending_size > MAX_UNSENT_BYTES:
            self.fail(self._cut())
        elif self._flusher is None and not self._closed:
            delay = 0.0 if self._due() else COALESCE_SECONDS
            self._flusher = asyncio.create_task(self._flush_soon(delay))

    async def write(self, response: tasks_pb2.WatchResponse) -> None:
        """`put` a response; when what waits is due at once, send it and wait for the
        subscriber to take it (one that reads slowly holds its watch back)."""
        if self._failure is not None:
            raise self._failure
        self._take(response.cursor, ",".join(self._encoded.event(e) for e in response.events))
        if self._due():
            await self.flush()
        elif self._flusher is None and not self._closed:
            self._flusher = asyncio.create_task(self._flush_soon(COALESCE_SECONDS))

    def _take(self, cursor: int, events: str) -> None:
        if events:
            if not self._pending:
                self.unsent = self._cursor
            self._pending.append(events)
            self._pending_size += len(events)
        self._cursor = cursor

    def _due(self) -> bool:
        """Whether what waits goes at once: the first message, or much waits."""
        return not self.open or self._pending_size >= _MAX_PENDING

    def fail(self, error: BaseException) -> None:
        if self._failure is None:
            self._failure = error
        self._failed.set()

    async def failed(self) -> None:
        """Raise its failure once it has one."""
        await self._failed.wait()
        assert self._failure is not None
        raise self._failure

    def discard(self) -> None:
        """Drop what it holds once its response is over: the events it did not send, and its
        failure (whose traceback holds its frames, and so it: a cycle that only a full
        collection would free)."""
        self._pending, self._pending_size, self._failure = [], 0, None

    async def _flush_soon(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._flushing = True
        try:
            await self.flush()
        except Exception as err:  # the subscriber is gone
            self.fail(err)
        finally:
            self._flushing = False
            self._flusher = None
            if self._pending and self._failure is None and not self._closed:
                # These came in while the message before was sent.
                self._flusher = asyncio.create_task(self._flush_soon(COALESCE_SECONDS))

    async def flush(self) -> None:
        """Send what waits as one message (the cursor alone when no event waits)."""
        async with self._lock:
            if not self._pending and self._cursor == self._sent:
                return
            parts = [f'"events":[{",".join(self._pending)}]'] if self._pending else []
            if self._cursor:
                parts.append(f'"cursor":"{self._cursor}"')  # a uint64: a string in JSON
            cursor, self._pending, self._pending_size = self._cursor, [], 0
            self.unsent = None
            await self._send(f"id: {cursor}\ndata: {{{','.join(parts)}}}\n\n".encode())
            self._sent = cursor

    async def close(self) -> None:
        """Stop the flush that waits to run (what it held stays, for a last flush), or let
        the one sending finish its message (briefly)."""
        self._closed = True
        flusher, self._flusher = self._flusher, None
        if flusher is None:
            return
        if not self._flushing:
            flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(flusher, _LAST_WORD_SECONDS)

    async def heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            if self.open:
                await self.send(b": keepalive\n\n")


def events_route(tasks: Any, caller: Caller) -> web.RouteDef:
    """GET /api/events over `tasks` (the Tasks servicer)."""
    path = method_path(_WATCH)
    encoded = EventJson()
    feeds = Feeds()
    slots = StreamSlots(per_caller=MAX_STREAMS_PER_CALLER, total=MAX_STREAMS)

    async def events(request: web.Request) -> web.StreamResponse:
        try:
            principal = caller.for_method(request, path)
            watch = watch_request(request.query.items(), request.headers.get("Last-Event-ID"))
            who = _caller_key(principal)
            slots.take(who)
        except ShoalError as err:
            return error_response(err, path)
        except Exception:
            return unexpected_response(path)
        stream = _Stream(request, encoded, tasks.fell_behind)
        try:
            served = _serve(tasks, watch, principal, stream, feeds, encoded)
            return await _respond(stream, served, path)
        finally:
            stream.discard()
            slots.give_back(who)

    return web.get(f"{API_PREFIX}/events", events)


async def _respond(
    stream: _Stream, serve: Coroutine[Any, Any, None], path: str
) -> web.StreamResponse:
    """Run `serve` over `stream` until it ends or the subscriber is gone, then end the
    response: with an `error` event when a Shoal error ended it."""
    heartbeat = asyncio.create_task(stream.heartbeat())
    served = asyncio.create_task(serve)
    try:
        # Whichever ends first: the watch, or a heartbeat that found the subscriber gone.
        await asyncio.wait((served, heartbeat), return_when=asyncio.FIRST_COMPLETED)
    finally:
        await stream.close()
        for task in (heartbeat, served):
            task.cancel()
        for task in (heartbeat, served):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if served.cancelled():
        return stream.response
    failure = served.exception()
    if isinstance(failure, ShoalError):
        if not stream.open:
            return error_response(failure, path)
        _, body = error_body(failure)
        # Best effort, and briefly: a subscriber cut for not reading may not read this.
        # What it was sent before the error goes first.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(_last_word(stream, body), _LAST_WORD_SECONDS)
    elif failure is not None and not isinstance(failure, ConnectionError):
        response = unexpected_response(path, failure)
        if not stream.open:
            return response
    return stream.response


async def _last_word(stream: _Stream, body: object) -> None:
    await stream.flush()
    await stream.send(_error(body))


async def _serve(
    tasks: Any,
    watch: tasks_pb2.WatchRequest,
    principal: Principal | None,
    stream: _Stream,
    feeds: Feeds,
    encoded: EventJson,
) -> None:
    """Serve a subscriber from the feed of its query and caller; from further back than the
    feed holds, from a Watch of its own until it has caught up with it."""
    live = tasks_pb2.WatchRequest()
    live.CopyFrom(watch)
    live.ClearField("since")
    key = (live.SerializeToString(deterministic=True), _caller_key(principal))

    def start(ended: Callable[[Feed], None]) -> Feed:
        with _acting(principal):
            batches = tasks.watch_events(live)
        return Feed(
            batches, encoded.event, behind=tasks.forgotten, cut=tasks.fell_behind, ended=ended
        )

    feed = feeds.get(key, start)
    try:
        await feed.ready.wait()
        if feed.failure is not None:
            raise feed.failure
        if not feed.join(stream, watch.since if watch.HasField("since") else None):

            def caught_up(cursor: int) -> bool:
                nonlocal feed
                if not feed.live:
                    feed = feeds.get(key, start)
                return feed.join(stream, cursor)

            with _acting(principal):
                await tasks.follow(watch, stream.write, until=caught_up)
        await stream.failed()
    finally:
        feed.leave(stream)


def _acting(principal: Principal | None) -> contextlib.AbstractContextManager[None]:
    """The servicer's calls made as `principal` (None: auth is off, as its default)."""
    return acting_as(principal) if principal is not None else contextlib.nullcontext()


def _caller_key(principal: Principal | None) -> tuple[str, ...]:
    """What a feed's events depend on of its caller: who (their token: revoked, the feed
    ends), and the tenant they see."""
    if principal is None:
        return ()
    return (principal.name, principal.token_id, principal.tenant, str(principal.role))
