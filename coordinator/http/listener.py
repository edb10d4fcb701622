"""The HTTP server's listening sockets and its accept loop: at most `limit` connections open at
once (each is a file: past the limit a connection is closed as soon as it is accepted), TLS
handshakes bounded in time, and a process out of files told in a line a minute.

asyncio's own accept loop logs every accept that fails for want of files, with a traceback,
about a hundred a second for as long as it lasts; this one waits a second and tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["Listener", "connection_limit"]

_log = logging.getLogger("shoal.http")

_BACKLOG = 128
_RETRY_SECONDS = 1.0  # out of files: accept again after this long (the backlog waits)
_LOG_SECONDS = 60.0  # a condition that repeats is logged once in this long
_SPARE_FILES = 256  # as shoal._server keeps for what is not a connection


def connection_limit(max_connections: int) -> int:
    """`max_connections` (gRPC's bound), kept to half the files this process may open beyond
    the few it keeps spare: the rest are for gRPC's connections."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_connections
    return max(16, min(max_connections, (soft - _SPARE_FILES) // 2))


class Listener:
    """Accepts connections for the protocols `factory` makes, at most `limit` open at once;
    `start`, then `stop`."""

    def __init__(
        self,
        factory: Callable[[], asyncio.Protocol],
        *,
        limit: int,
        tls: ssl.SSLContext | None = None,
        handshake_timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._factory = factory
        self._limit = limit
        self._open = 0  # connections accepted and not yet closed
        self._tls = tls
        self._handshake_timeout = handshake_timeout
        self._full = _Repeated(clock)
        self._starved = _Repeated(clock)
        self._sockets: list[socket.socket] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen on every address of `host` (every interface when empty), on `port` (0: one
        the system picks, the same for all); returns the port."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        try:
            for family, _, _, _, address in dict.fromkeys(infos):
                sock = socket.create_server(
                    (address[0], port, *address[2:]), family=family, backlog=_BACKLOG
                )
                self._sockets.append(sock)
                sock.setblocking(False)
                port = port or sock.getsockname()[1]
        except OSError:
            await self.stop()
            raise
        for sock in self._sockets:
            self._spawn(self._accept(sock))
        return port

    async def stop(self) -> None:
        """Stop accepting and close the listening sockets (connections stay, for the server's
        own shutdown); idempotent."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0)  # an accept that need not wait yields nothing: let others run
            try:
                conn, _ = await loop.sock_accept(sock)
            except ConnectionAbortedError:
                continue  # gone before it was accepted
            except OSError as err:  # out of files (EMFILE, ENFILE), buffers or memory
                if (times := self._starved.due()) is not None:
                    _log.warning(
                        "HTTP cannot accept connections: %s (%d tries since the last such line)",
                        err.strerror or err,
                        times,
                    )
                await asyncio.sleep(_RETRY_SECONDS)
                continue
            if self._open >= self._limit:
                conn.close()
                if (times := self._full.due()) is not None:
                    _log.warning(
                        "HTTP has %d connections open, its most: new ones are closed"
                        " (%d closed since the last such line)",
                        self._limit,
                        times,
                    )
                continue
            self._open += 1  # now: the task that serves it may not start before the next accept
            self._spawn(self._serve(conn))

    async def _serve(self, conn: socket.socket) -> None:
        """Hand `conn` (counted open) to a protocol of its own, after its TLS handshake if
        any."""
        slot = _Slot(self._factory(), self._closed)
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: slot,
                conn,
                ssl=self._tls,
                ssl_handshake_timeout=self._handshake_timeout if self._tls else None,
            )
        except BaseException as err:  # a failed handshake (the client is gone), or we stop
            slot.free()
            conn.close()
            if not isinstance(err, Exception):
                raise

    def _closed(self) -> None:
        self._open -= 1


class _Slot(asyncio.Protocol):
    """The protocol of a connection (`inner`'s), holding a place among the open connections
    until the connection is lost."""

    def __init__(self, inner: asyncio.Protocol, free: Callable[[], None]) -> None:
        self._inner = inner
        self._free: Callable[[], None] | None = free

    def free(self) -> None:
        free, self._free = self._free, None
        if free is not None:
            free()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.free()
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class _Repeated:
    """A condition that may repeat many times a second, logged at most once in _LOG_SECONDS."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._next = float("-inf")
        self._since = 0  # times it came since the last line

    def due(self) -> int | None:
        """It came once more: None when not to log it now, else how many times it came since
        the last line (this one too)."""
        now = self._clock()
        self._since += 1
        if now < self._next:
            return None
        times, self._since, self._next = self._since, 0, now + _LOG_SECONDS
        return times
