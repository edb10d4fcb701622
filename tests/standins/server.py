"""A small HTTP/1.1 server on loopback port 0, on the test's own loop, for stand-ins of APIs.

One request per connection (`Connection: close`); answers are whole (JSON) or streamed in
chunks (NDJSON, server-sent events). It notices a client that goes away while it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from abc import ABC, abstractmethod
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Self
from urllib.parse import parse_qsl, urlsplit

__all__ = ["ClientGone", "Exchange", "HttpStandIn", "Request"]

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
    529: "Overloaded",
}


class ClientGone(Exception):
    """The client closed its connection before the answer ended."""


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the query
    query: dict[str, str]
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class Exchange:
    """One request, and the means to answer it."""

    def __init__(self, request: Request, writer: asyncio.StreamWriter) -> None:
        self.request = request
        self.gone = asyncio.Event()  # set once the client closed its connection
        self._writer = writer
        self._streaming = False

    async def _write(self, data: bytes) -> None:
        if self.gone.is_set():
            raise ClientGone
        try:
            self._writer.write(data)
            await self._writer.drain()
        except ConnectionError as err:
            self.gone.set()
            raise ClientGone from err

    async def _head(self, status: int, headers: dict[str, str]) -> None:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        await self._write(("\r\n".join(lines) + "\r\n\r\n").encode())

    async def send(self, status: int, body: bytes, content_type: str) -> None:
        """A whole answer."""
        await self._head(status, {"Content-Type": content_type, "Content-Length": str(len(body))})

        await self._write(body)

    async def send_json(self, status: int, obj: Any) -> None:
        await self.send(status, json.dumps(obj).encode(), "application/json")

    async def start_stream(self, content_type: str) -> None:
        """A 200 whose body follows in chunks (`send_chunk`, then `end_stream`)."""
        await self._head(200, {"Content-Type": content_type, "Transfer-Encoding": "chunked"})
        self._streaming = True

    async def send_chunk(self, data: bytes) -> None:
        assert self._streaming and data
        await self._write(b"%x\r\n%s\r\n" % (len(data), data))

    async def end_stream(self) -> None:
        await self._write(b"0\r\n\r\n")

    async def wait(self, awaitable: Awaitable[Any]) -> None:
        """Await it unless the client goes away first (then raise ClientGone)."""
        work = asyncio.ensure_future(awaitable)
        gone = asyncio.ensure_future(self.gone.wait())
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
        if not work.done() or work.cancelled():
            raise ClientGone
        work.result()


class HttpStandIn(ABC):
    """Serves `handle` on http://127.0.0.1:<port 0> once started; records every request.

    `abandoned` is set when a client goes away before its answer ended; `go_away` stops
    listening, so that connecting is refused.
    """

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.abandoned = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._connections)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def go_away(self) -> None:
        """Stop listening: from now on, connections to its port are refused."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def aclose(self) -> None:
        await self.go_away()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    @abstractmethod
    async def handle(self, exchange: Exchange) -> None:
        """Answer one request."""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            request = await _read_request(reader)
            if request is None:
                return
            self.requests.append(request)
            exchange = Exchange(request, writer)
            # The client sends nothing more: EOF means it closed the connection.
            watch = asyncio.create_task(_until_eof(reader, exchange.gone))
            try:
                await self.handle(exchange)
            except ClientGone:
                self.abandoned.set()
            finally:
                watch.cancel()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def _until_eof(reader: asyncio.StreamReader, gone: asyncio.Event) -> None:
    with contextlib.suppress(ConnectionError):
        while await reader.read(1 << 16):
            pass
    gone.set()


async def _read_request(reader: asyncio.StreamReader) -> Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None  # a probe that connected and left
    line, *fields = head.decode("latin-1").split("\r\n")
    method, target, _ = line.split(" ", 2)
    headers = {}
    for field in fields:
        if field:
            name, _, value = field.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    url = urlsplit(target)
    return Request(method, url.path, dict(parse_qsl(url.query)), headers, body)
