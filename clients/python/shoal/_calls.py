"""How the SDK calls a coordinator: each call's deadline and metadata, and resending while the
coordinator is unavailable (for `retry_for`; `connect_for` until it first answered)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from types import EllipsisType
from typing import Any, TypeVar, cast

import grpc
from tenacity import (
    AsyncRetrying,
    Retrying,
    retry_if_exception_type,
    retry_never,
    wait_exponential_jitter,
)

from shoal._status import from_rpc_error, from_server
from shoal.errors import ShoalError, Unauthenticated, Unavailable

__all__ = ["Calls"]

_T = TypeVar("_T")
_BACKOFF = wait_exponential_jitter(initial=0.05, jitter=0.05, max=5.0)


def _first_wait() -> float:
    """Before the first resend: what _BACKOFF waits before its second try."""
    return 0.05 + random.uniform(0, 0.05)


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
        token_hint: str = "",
    ) -> None:
        self.target = target
        self.metadata = metadata
        self._token_hint = token_hint  # added to a refusal of the token: where it came from
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
        to `retry_for` from when it was found so (a long Wait that a restart cut off is
        resent too)."""
        deadline = self.timeout if timeout is ... else timeout
        try:  # the first try outside the retry loop: a call answered costs nothing more
            return await self._call(method(request, timeout=deadline, metadata=self.metadata))
        except Unavailable as err:
            failed = self._resend_or_raise(err, retry)
        await asyncio.sleep(_first_wait())
        try:
            async for attempt in AsyncRetrying(**self._resends(failed)):
                with attempt:
                    return await self._call(
                        method(request, timeout=deadline, metadata=self.metadata)
                    )
        except Unavailable as err:
            raise self._unreached(err) from None
        raise AssertionError("unreachable")

    def blocking(
        self,
        method: Any,
        request: Any,
        *,
        timeout: float | EllipsisType | None = ...,
        retry: bool = True,
    ) -> Any:
        """`unary` through a blocking stub, in the calling thread."""
        deadline = self.timeout if timeout is ... else timeout
        try:
            return self._answer(method, request, deadline)
        except Unavailable as err:
            failed = self._resend_or_raise(err, retry)
        time.sleep(_first_wait())
        try:
            for attempt in Retrying(**self._resends(failed)):
                with attempt:
                    return self._answer(method, request, deadline)
        except Unavailable as err:
            raise self._unreached(err) from None
        raise AssertionError("unreachable")

    def _resend_or_raise(self, err: Unavailable, retry: bool) -> float:
        """After a first try found the coordinator unavailable: raise, or return when it did
        (to resend from then)."""
        if not retry or self._given_up(0.0):
            raise self._unreached(err) from None
        return time.monotonic()

    def _resends(self, failed: float) -> dict[str, Any]:
        """How a call whose first try found no coordinator (at `failed`) is resent, after
        `_first_wait()`: with backoff, until `_given_up`."""
        return {
            "retry": retry_if_exception_type(Unavailable),
            "wait": _BACKOFF,
            "stop": lambda _: self._given_up(time.monotonic() - failed),
            "reraise": True,
        }

    async def open_stream(self, start: Callable[..., Any], *, retry: bool) -> tuple[Any, Any]:
        """A server stream `start(metadata=...)` opens, and its first response, read to know it
        is open; with `retry`, opened anew with backoff while the coordinator is unavailable
        (for `connect_for` only while no coordinator ever answered)."""
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(Unavailable) if retry else retry_never,
                wait=_BACKOFF,
                stop=lambda state: (
                    not self._reached and self._given_up(state.seconds_since_start or 0.0)
                ),
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
            raise self._failed(err) from None
        self._reached = True
        return response

    def _answer(self, method: Any, request: Any, deadline: float | None) -> Any:
        """_call's blocking twin: one call through a blocking stub."""
        try:
            response = method(request, timeout=deadline, metadata=self.metadata)
        except grpc.RpcError as err:
            raise self._failed(err) from None
        self._reached = True
        return response

    def _failed(self, err: grpc.RpcError) -> ShoalError:
        """The error a failed call raises; notes whether a coordinator answered it."""
        if cast(grpc.Call, err).code() != grpc.StatusCode.UNAVAILABLE or from_server(err):
            self._reached = True
        error = from_rpc_error(err)
        if isinstance(error, Unauthenticated) and self._token_hint:
            return Unauthenticated(f"{error.message} ({self._token_hint})")
        return error

    def _given_up(self, elapsed: float) -> bool:
        """Whether to stop resending after `elapsed` seconds: after `retry_for`, or
        `connect_for` while no coordinator ever answered (decided anew at each try: one may
        answer meanwhile)."""
        limit = self._retry_for if self._reached else self._connect_for
        return elapsed >= limit

    def _unreached(self, err: Unavailable) -> Unavailable:
        """`err`, naming the address tried when no coordinator ever answered there."""
        if self._reached:
            return err
        return Unavailable(f"cannot reach a coordinator at {self.target}: {err.message}")
