"""A channel over several coordinators that sends every call to the one that leads.

With TLS, each coordinator's certificate names its own address, so each address needs a
channel of its own (one gRPC channel over several addresses checks every certificate against
one name). Each is watched with grpc.health.v1.Health/Watch: the leader is the one SERVING
(standbys answer NOT_SERVING); while none is, calls go to each address in turn and fail
UNAVAILABLE, which callers retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["LeaderChannel"]

_RETRY_WATCH = 0.25  # seconds between two tries to watch an address that did not answer
_SERVING = health_pb2.HealthCheckResponse.SERVING


class LeaderChannel(grpc.aio.Channel):  # type: ignore[misc]  # grpc ships no types
    """Channels to `addresses` (made by `dial`), and calls to whichever of them is SERVING."""

    def __init__(self, addresses: Sequence[str], dial: Callable[[str], grpc.aio.Channel]) -> None:
        self._addresses = list(addresses)
        self._channels = [dial(a) for a in self._addresses]
        self._serving: set[int] = set()
        self._turn = itertools.cycle(range(len(self._channels)))
        self._watchers: list[asyncio.Task[None]] = []
        self._changed: asyncio.Event | None = None

    @property
    def leader(self) -> str:
        """The address that serves, as last seen ('' when none does)."""
        return next((self._addresses[i] for i in sorted(self._serving)), "")

    def _current(self) -> grpc.aio.Channel:
        if not self._watchers:
            self._watch()
        for index in sorted(self._serving):
            return self._channels[index]
        return self._channels[next(self._turn)]

    def _watch(self) -> None:
        self._changed = asyncio.Event()
        self._watchers = [
            asyncio.get_running_loop().create_task(self._follow(i), name=f"shoal-leader-{a}")
            for i, a in enumerate(self._addresses)
        ]

    async def _follow(self, index: int) -> None:
        """Keep `index` in `_serving` while its health is SERVING."""
        stub = health_pb2_grpc.HealthStub(self._channels[index])
        while True:
            try:
                async for reply in stub.Watch(health_pb2.HealthCheckRequest(service="")):
                    self._mark(index, reply.status == _SERVING)
            except grpc.aio.AioRpcError:
                pass
            self._mark(index, False)
            await asyncio.sleep(_RETRY_WATCH)

    def _mark(self, index: int, serving: bool) -> None:
        before = index in self._serving
        if serving:
            self._serving.add(index)
        else:
            self._serving.discard(index)
        if before != serving and self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    # -- grpc.aio.Channel ----------------------------------------------------------------------

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Dispatch(lambda: self._current().unary_unary(method, *args, **kwargs))

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Dispatch(lambda: self._current().unary_stream(method, *args, **kwargs))

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Dispatch(lambda: self._current().stream_unary(method, *args, **kwargs))

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Dispatch(lambda: self._current().stream_stream(method, *args, **kwargs))

    async def close(self, grace: float | None = None) -> None:
        watchers, self._watchers = self._watchers, []
        for watcher in watchers:
            watcher.cancel()
        for watcher in watchers:
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        for channel in self._channels:
            await channel.close(grace)

    async def __aenter__(self) -> LeaderChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._current().get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._current().wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        """Return once one of the coordinators serves."""
        self._current()
        while not self._serving:
            assert self._changed is not None
            await self._changed.wait()

    async def found(self, timeout: float) -> str:
        """The leader's address once one serves, waiting up to `timeout` seconds ('' if none
        did by then): a call made afterwards goes to it, not to the first address in turn."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.channel_ready(), timeout)
        return self.leader


class _Dispatch:
    """A multi-callable whose calls go to the channel that leads when each call is made."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._make()(*args, **kwargs)
