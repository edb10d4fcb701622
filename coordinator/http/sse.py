"""GET /api/events: Tasks.Watch as Server-Sent Events.

Each message's `id:` is the Watch cursor after it and its `data:` the WatchResponse as JSON;
a browser that reconnects sends the last id back (Last-Event-ID) and resumes after it, losing
and repeating nothing. It is the same servicer method as gRPC's Watch, so a subscriber that
reads slower than events come is cut the same way (an `error` event, then the stream ends;
it reconnects from its last id), and what one holds in memory stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from aiohttp import web
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from shoal._gate import acting_as
from shoal.coordinator.http.auth import Caller
from shoal.coordinator.http.context import HttpCallContext
from shoal.coordinator.http.errors import error_body, error_response, unexpected_response
from shoal.coordinator.http.rpc import API_PREFIX, method_path
from shoal.errors import InvalidArgument, ShoalError
from shoal.v1 import task_pb2, tasks_pb2

__all__ = ["HEARTBEAT_SECONDS", "EventJson", "events_route", "watch_request"]

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
    """One subscriber's response: opened at its first message, written one at a time."""

    def __init__(self, request: web.Request, encoded: EventJson) -> None:
        self._request = request
        self._encoded = encoded
        self.response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache, no-store",
                "X-Accel-Buffering": "no",  # proxies pass each message on at once
            }
        )
        self._lock = asyncio.Lock()

    @property
    def open(self) -> bool:
        return self.response.prepared

    async def send(self, chunk: bytes) -> None:
        async with self._lock:
            if not self.response.prepared:
                await self.response.prepare(self._request)
            await self.response.write(chunk)

    async def write(self, response: tasks_pb2.WatchResponse) -> None:
        data = self._encoded.response(response)
        await self.send(f"id: {response.cursor}\ndata: {data}\n\n".encode())

    async def heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            if self.open:
                await self.send(b": keepalive\n\n")


def events_route(tasks: Any, caller: Caller) -> web.RouteDef:
    """GET /api/events over `tasks` (the Tasks servicer)."""
    path = method_path(_WATCH)
    encoded = EventJson()

    async def events(request: web.Request) -> web.StreamResponse:
        try:
            principal = caller.for_method(request, path)
            watch = watch_request(request.query.items(), request.headers.get("Last-Event-ID"))
        except ShoalError as err:
            return error_response(err, path)
        except Exception:
            return unexpected_response(path)
        stream = _Stream(request, encoded)
        heartbeat = asyncio.create_task(stream.heartbeat())
        served = asyncio.create_task(_serve(tasks, watch, principal, request, stream))
        try:
            # Whichever ends first: the watch, or a heartbeat that found the subscriber gone.
            await asyncio.wait((served, heartbeat), return_when=asyncio.FIRST_COMPLETED)
        finally:
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
            with contextlib.suppress(Exception):
                await asyncio.wait_for(stream.send(_error(body)), _LAST_WORD_SECONDS)
        elif failure is not None and not isinstance(failure, ConnectionError):
            response = unexpected_response(path, failure)
            if not stream.open:
                return response
        return stream.response

    return web.get(f"{API_PREFIX}/events", events)


async def _serve(
    tasks: Any,
    watch: tasks_pb2.WatchRequest,
    principal: Any,
    request: web.Request,
    stream: _Stream,
) -> None:
    context = HttpCallContext(request, stream.write)
    if principal is None:
        await tasks.Watch(watch, context)
    else:
        with acting_as(principal):
            await tasks.Watch(watch, context)
