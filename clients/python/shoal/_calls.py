"""How the SDK calls a coordinator: each call's deadline and metadata, and resending while the
coordinator is unavailable (for `retry_for`; `connect_for` until it first answered)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import EllipsisType
from typing import Any, TypeVar

import grpc
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    retry_never,
    wait_exponential_jitter,
)

from shoal._status import from_rpc_error, from_server
from shoal.errors import Unavailable

__all__ = ["Calls"]

_T = TypeVar("_T")
_BACKOFF = wait_exponential_jitter(initial=0.05, jitter=0.05, max=5.0)


class Calls:
    """Calls to the coordinator at `target`, each sent with `metadata` and, unless told
    otherwise, a deadline of `timeout` seconds."""

    def __init__(
        self,
        target: str,
        metadata: tuple[tuple[str, str], ...],
        *,
        timeout: float,
        retry_for: float,
        connect_for: float,
    ) -> None:
        self.target = target
        self.metadata = metadata
        self.timeout = timeout
        self._retry_for = retry_for
        self._connect_for = min(connect_for, retry_for)
        # Whether a coordinator ever answered: only then is "unavailable" worth riding out.
        self._reached = False

    async def unary(
        self,
        method: Any,
        request: Any,
        *,
        timeout: float | EllipsisType | None = ...,
        retry: bool = True,
    ) -> Any:
        """One call (`timeout`: the client's; None: none); with `retry` (it is safe to repeat),
        resent while the coordinator is unavailable, with jittered exponential backoff, for up
        to `retry_for`."""
        deadline = self.timeout if timeout is ... else timeout
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(Unavailable) if retry else retry_never,
                wait=_BACKOFF,
                stop=self._given_up,
                reraise=True,
            ):
                with attempt:
                    return await self._call(
                        method(request, timeout=deadline, metadata=self.metadata)
                    )
        except Unavailable as err:
            raise self._unreached(err) from None
        raise AssertionError("unreachable")

    async def open_stream(self, start: Callable[..., Any], *, retry: bool) -> tuple[Any, Any]:
        """A server stream `start(metadata=...)` opens, and its first response, read to know it
        is open; with `retry`, opened anew with backoff while the coordinator is unavailable
        (for `connect_for` only while no coordinator ever answered)."""
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(Unavailable) if retry else retry_never,
                wait=_BACKOFF,
                stop=lambda state: not self._reached and self._given_up(state),
                reraise=True,
            ):
                with attempt:
                    stream = start(metadata=self.metadata)
                    first = await self._call(stream.read())
                    if first is grpc.aio.EOF:
                        raise Unavailable("the stream ended before it started")
                    return stream, first
        except Unavailable as err:
            raise self._unreached(err) from None
        raise AssertionError("unreachable")

    async def _call(self, awaitable: Awaitable[_T]) -> _T:
        """Await one call; notes whether a coordinator answered it, even with an error."""
        try:
            response = await awaitable
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE or from_server(err):
                self._reached = True
            raise from_rpc_error(err) from None
        self._reached = True
        return response

    def _given_up(self, state: RetryCallState) -> bool:
        """Whether to stop resending: after `retry_for`, or `connect_for` while no coordinator
        ever answered (decided anew at each try: one may answer meanwhile)."""
        limit = self._retry_for if self._reached else self._connect_for
        return (state.seconds_since_start or 0.0) >= limit

    def _unreached(self, err: Unavailable) -> Unavailable:
        """`err`, naming the address tried when no coordinator ever answered there."""
        if self._reached:
            return err
        return Unavailable(f"cannot reach a coordinator at {self.target}: {err.message}")
