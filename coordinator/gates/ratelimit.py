"""A token bucket: the rate limit behind node sessions and quotas. No I/O here."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["TokenBucket"]


class TokenBucket:
    """`rate` tokens a second, holding at most `burst`; time comes from an injected clock."""

    def __init__(
        self, rate: float, burst: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._last = clock()

    def take(self, n: float = 1) -> float:
        """Take `n` tokens, going into debt if need be; returns seconds until the debt is paid."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate) - n
        self._last = now
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def wait(self, n: float = 1) -> float:
        """Seconds until `n` tokens are there (0: now); takes nothing."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        return 0.0 if self._tokens >= n else (n - self._tokens) / self.rate
