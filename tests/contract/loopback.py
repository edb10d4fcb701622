"""A tiny real HTTP/1.1 server on loopback for the `http` executor's tests.

Routes (every response closes its connection):
  /text             200 text/plain, its body in two chunks: "hello from the loopback\\n"
  /json             200 application/json {"greeting": "hello", "n": 3}
  /list             200 application/json [1, 2] (JSON, but no object)
  /hold             200 text/plain, "holding\\n", then nothing until the client goes
  /status/<code>    that status, body "status <code>\\n"
  /redirect?to=URL  302 to URL
  /echo             200 application/json: the request's method, headers and body
  /big?n=N          200 text/plain, N bytes of "x"
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Self
from urllib.parse import parse_qs, urlsplit

__all__ = ["LoopbackHttp"]

_REASONS = {200: "OK", 302: "Found", 404: "Not Found", 503: "Service Unavailable"}


class LoopbackHttp:
    """`async with LoopbackHttp() as http` (or `start()` and `aclose()`), then `url(path)`.
    `holding` counts the /hold responses whose client is still connected; `served` counts
    requests by path, and `received` holds each request's path and headers (lower-case names)."""

    def __init__(self) -> None:
        self.port = 0
        self.holding = 0
        self.served: dict[str, int] = {}
        self.received: list[tuple[str, dict[str, str]]] = []
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    def url(self, path: str, *, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            url = urlsplit(target)
            self.served[url.path] = self.served.get(url.path, 0) + 1
            self.received.append((url.path, headers))
            await self._route(method, url.path, parse_qs(url.query), headers, body, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _route(
        self,
        method: str,
        path: str,
        query: dict[str, list[str]],
        headers: dict[str, str],
        body: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        if path == "/text":
            await _chunked(
                writer, 200, "text/plain; charset=utf-8", [b"hello from ", b"the loopback\n"]
            )
        elif path == "/json":
            await _whole(writer, 200, "application/json", b'{"greeting": "hello", "n": 3}')
        elif path == "/list":
            await _whole(writer, 200, "application/json", b"[1, 2]")
        elif path == "/hold":
            self.holding += 1
            try:
                await _chunked(writer, 200, "text/plain", [b"holding\n"], end=False)
                await reader.read()  # returns once the client has closed the connection
            finally:
                self.holding -= 1
        elif path.startswith("/status/"):
            code = int(path.removeprefix("/status/"))
            await _whole(writer, code, "text/plain", f"status {code}\n".encode())
        elif path == "/redirect":
            await _whole(writer, 302, "text/plain", b"", location=query["to"][0])
        elif path == "/echo":
            echo = {"method": method, "headers": headers, "body": body.decode("utf-8", "replace")}
            await _whole(writer, 200, "application/json", json.dumps(echo).encode())
        elif path == "/big":
            await _whole(writer, 200, "text/plain", b"x" * int(query["n"][0]))
        else:
            await _whole(writer, 404, "text/plain", b"no such route\n")


def _head(code: int, media_type: str, extra: str) -> bytes:
    reason = _REASONS.get(code, "Status")
    return (
        f"HTTP/1.1 {code} {reason}\r\ncontent-type: {media_type}\r\nconnection: close\r\n"
        f"{extra}\r\n"
    ).encode("latin-1")


async def _whole(
    writer: asyncio.StreamWriter, code: int, media_type: str, body: bytes, *, location: str = ""
) -> None:
    extra = f"content-length: {len(body)}\r\n" + (f"location: {location}\r\n" if location else "")
    writer.write(_head(code, media_type, extra) + body)
    await writer.drain()


async def _chunked(
    writer: asyncio.StreamWriter,
    code: int,
    media_type: str,
    chunks: list[bytes],
    *,
    end: bool = True,
) -> None:
    writer.write(_head(code, media_type, "transfer-encoding: chunked\r\n"))
    for chunk in chunks:
        writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        await writer.drain()
    if end:
        writer.write(b"0\r\n\r\n")
        await writer.drain()
