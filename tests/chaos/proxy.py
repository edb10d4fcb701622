"""A gRPC proxy that loses answers: the call commits upstream, the caller sees UNAVAILABLE.

It forwards the client-facing services (Tasks, Admin) as raw bytes — identity
(de)serialisers on both sides, so it needs no knowledge of the messages — with the caller's
metadata and deadline, and passes upstream errors back with their status details. For the
methods named in `drop_first_reply`, the first time it sees a given request (same bytes) it
forwards it, keeps the answer and aborts the call with UNAVAILABLE; a retry of the same
request gets its answer through.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from typing import Any

import grpc

from shoal.v1 import admin_pb2, tasks_pb2

__all__ = ["Exchange", "FaultProxy"]

_FORWARDED = (
    tasks_pb2.DESCRIPTOR.services_by_name["Tasks"],
    admin_pb2.DESCRIPTOR.services_by_name["Admin"],
)
_HOP_BY_HOP = frozenset({"user-agent", "te", "content-type", "grpc-accept-encoding"})


@dataclass
class Exchange:
    """One distinct request to a faulty method and the answers the coordinator gave it."""

    request: bytes
    dropped: bytes | None = None  # the answer of the first try, which the caller never saw
    delivered: list[bytes] = field(default_factory=list)  # answers of later tries

    @property
    def tries(self) -> int:
        return (self.dropped is not None) + len(self.delivered)


class FaultProxy:
    """Forwards to `target`; `start()` binds 127.0.0.1:0, `stop()` is idempotent."""

    def __init__(self, target: str, *, drop_first_reply: Collection[str] = ()) -> None:
        self.target = target
        self.drop_first_reply = frozenset(drop_first_reply)
        self.exchanges: dict[bytes, Exchange] = {}  # by sha256 of the request
        self.forwarded = 0
        self.port = 0
        self._channel: grpc.aio.Channel | None = None
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.target)
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        for service in _FORWARDED:
            handlers = {}
            for method in service.methods:
                path = f"/{service.full_name}/{method.name}"
                if method.client_streaming:
                    continue  # clients stream nothing to these services
                if method.server_streaming:
                    handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                        self._stream_forwarder(path)
                    )
                else:
                    handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                        self._unary_forwarder(path)
                    )
            server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(service.full_name, handlers),)
            )
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop(0)
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _unary_forwarder(self, path: str) -> Any:
        async def forward(request: bytes, context: Any) -> bytes:
            assert self._channel is not None
            call = self._channel.unary_unary(path)
            try:
                answer: bytes = await call(
                    request, metadata=_metadata(context), timeout=context.time_remaining()
                )
            except grpc.aio.AioRpcError as err:
                await _relay(err, context)
                raise AssertionError("unreachable: abort raises") from err
            self.forwarded += 1
            if path in self.drop_first_reply:
                key = hashlib.sha256(request).digest()
                exchange = self.exchanges.setdefault(key, Exchange(request))
                if exchange.dropped is None:
                    exchange.dropped = answer
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "chaos proxy lost the answer")
                exchange.delivered.append(answer)
            return answer

        return forward

    def _stream_forwarder(self, path: str) -> Any:
        async def forward(request: bytes, context: Any) -> AsyncIterator[bytes]:
            assert self._channel is not None
            call = self._channel.unary_stream(path)(
                request, metadata=_metadata(context), timeout=context.time_remaining()
            )
            try:
                async for answer in call:
                    yield answer
            except grpc.aio.AioRpcError as err:
                await _relay(err, context)
            finally:
                call.cancel()

        return forward


def _metadata(context: Any) -> tuple[tuple[str, Any], ...]:
    """The caller's metadata (its token above all), less what gRPC sets per connection."""
    return tuple(
        (key, value)
        for key, value in context.invocation_metadata() or ()
        if not key.startswith(":") and key not in _HOP_BY_HOP
    )


async def _relay(err: grpc.aio.AioRpcError, context: Any) -> None:
    """End the caller's call with the upstream status, details and trailers (RetryInfo...)."""
    trailers = tuple((key, value) for key, value in err.trailing_metadata() or ())
    await context.abort(err.code(), err.details() or "", trailers)
