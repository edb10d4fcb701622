"""What HTTP callers may take at once: event streams (per caller and in all) and logins (per
address and per token). A refusal is ResourceExhausted with a retry delay: 429 and Retry-After.
"""

from __future__ import annotations

import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from datetime import timedelta

from shoal.coordinator.gates.ratelimit import TokenBucket
from shoal.errors import FieldViolation, ResourceExhausted

__all__ = ["LoginLimit", "StreamSlots"]

_STREAM_RETRY = timedelta(seconds=5)


class StreamSlots:
    """At most `per_caller` event streams open at once per caller, and `total` in all: what a
    stream holds (events it has yet to send, its feed's recent batches) is bounded, so the
    streams bound the memory they take."""

    def __init__(self, *, per_caller: int, total: int) -> None:
        self._per_caller = per_caller
        self._total = total
        self._open: Counter[Hashable] = Counter()

    def take(self, caller: Hashable) -> None:
        """Count a stream of `caller` open, or raise ResourceExhausted when it has no room."""
        if self._open.total() >= self._total:
            raise ResourceExhausted(
                f"this server has {self._total} event streams open, its most: try again later",
                retry_after=_STREAM_RETRY,
                quota=[FieldViolation("http:events", "event streams open at once")],
            )
        if self._open[caller] >= self._per_caller:
            raise ResourceExhausted(
                f"this caller has {self._per_caller} event streams open, its most: close one",
                retry_after=_STREAM_RETRY,
                quota=[FieldViolation("http:events", "event streams open at once per caller")],
            )
        self._open[caller] += 1

    def give_back(self, caller: Hashable) -> None:
        """A stream `take` counted has ended."""
        self._open[caller] -= 1
        if self._open[caller] <= 0:
            del self._open[caller]


class LoginLimit:
    """Logins per key (an address, a token): `burst` at once, then `rate` a second. Each login
    opens a session and checks a token: a caller cannot churn sessions or spend the server's
    time on them. The keys seen last are kept (at most `max_keys`)."""

    def __init__(
        self,
        *,
        rate: float = 0.2,
        burst: int = 10,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = rate
        self._burst = burst
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()

    def take(self, key: Hashable, who: str) -> None:
        """Count a login of `key` (`who` names it in the refusal), or raise ResourceExhausted
        when it logs in too often."""
        bucket = self._buckets.pop(key, None) or TokenBucket(
            self._rate, self._burst, clock=self._clock
        )
        self._buckets[key] = bucket
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        wait = bucket.wait()
        if wait > 0:
            raise ResourceExhausted(
                f"too many logins {who}: try again in {math.ceil(wait)} s",
                retry_after=timedelta(seconds=wait),
                quota=[FieldViolation("http:login", "logins per address and per token")],
            )
        bucket.take()
