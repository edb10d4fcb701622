"""Backpressure on submits: caps on unfinished tasks, in all and per tenant, and tenant rates."""

from __future__ import annotations

import random
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from datetime import timedelta

from shoal.coordinator.gates.ratelimit import TokenBucket
from shoal.errors import FieldViolation, ResourceExhausted
from shoal.v1 import task_pb2
from shoal.validation import Limits

__all__ = ["Backpressure"]

_RETRY = timedelta(seconds=1)
_MAX_WAITERS = 10_000  # clients held in line; more are refused without a place
_MIN_WAIT, _MAX_WAIT = 0.05, 10.0  # seconds a RetryInfo names, at least and at most
_RATE_WINDOW = 0.25  # seconds over which the drain rate is measured, at least


def _retry_unless(never_fits: bool) -> timedelta | None:
    """The delay to suggest to a refused submit; none when waiting would not help."""
    return None if never_fits else _RETRY


class Backpressure:
    """Refuses a batch beyond the limits; `unfinished` (per tenant) is the core's count."""

    def __init__(
        self,
        limits: Limits,
        unfinished: Counter[str],
        *,
        clock: Callable[[], float] = time.monotonic,
        finished: Callable[[], int] = lambda: 0,
        rng: random.Random | None = None,
    ) -> None:
        self._limits = limits
        self._unfinished = unfinished
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}  # per tenant
        # Clients refused while full, in the order they came, each with the tasks it asked
        # for and when its place lapses: room that frees up goes to them in that order, so a
        # client that waits as told is not overtaken by one that retries at once.
        self._line: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._finished = finished  # tasks finished so far: the drain rate
        # When, how many had finished, the rate then (None: not measured yet).
        self._sample: tuple[float, int, float | None] = (clock(), -1, None)
        self._rng = rng or random.Random()

    def reserve(self, specs: Sequence[task_pb2.TaskSpec], *, waiter: str = "") -> Counter[str]:
        """Count `specs` as unfinished at once (per tenant, returned for `release`), or raise
        ResourceExhausted, with a retry delay, beyond the unfinished-task caps or rates.

        Reserving before the caller awaits makes the caps hard: batches submitted at once
        each see the others. `waiter` names the client (one connection of one principal):
        refused while the cap is reached, it takes a place in line, and is admitted once the
        room freed is its turn.
        """
        per_tenant = Counter(spec.tenant for spec in specs)
        self._check(len(specs), per_tenant, waiter)
        self._unfinished.update(per_tenant)
        return per_tenant

    def release(self, reserved: Counter[str]) -> None:
        """Give back what `reserve` counted, for tasks that were not created."""
        self._unfinished.subtract(reserved)

    def _check(self, n: int, per_tenant: Counter[str], waiter: str) -> None:
        limits = self._limits
        total = sum(self._unfinished.values())
        ahead = self._ahead_of(waiter) if self._line else 0
        if total + ahead + n > limits.max_queued:
            if n > limits.max_queued:
                retry = None
            else:
                retry = self._retry_delay(total + ahead + n - limits.max_queued)
                self._hold_place(waiter, n, retry)
            raise ResourceExhausted(
                f"{total} tasks are unfinished; the limit is {limits.max_queued}"
                + (f" and {ahead} more are waiting before this call" if ahead else ""),
                retry_after=retry,
            )
        if self._line:
            self._line.pop(waiter, None)
        if not (limits.max_queued_per_tenant or limits.tenant_submit_rate):
            return
        for tenant, n in per_tenant.items():
            subject = f"tenant:{tenant}"
            if (
                limits.max_queued_per_tenant
                and self._unfinished[tenant] + n > limits.max_queued_per_tenant
            ):
                raise ResourceExhausted(
                    f"tenant {tenant!r} has {self._unfinished[tenant]} unfinished tasks;"
                    f" the limit is {limits.max_queued_per_tenant}",
                    retry_after=_retry_unless(n > limits.max_queued_per_tenant),
                    quota=[FieldViolation(subject, "unfinished tasks")],
                )
            if limits.tenant_submit_rate:
                wait = self._bucket(tenant).wait(n)
                if wait > 0:
                    burst = self._bucket(tenant).burst
                    raise ResourceExhausted(
                        f"tenant {tenant!r} submits faster than {limits.tenant_submit_rate:g}"
                        " tasks a second",
                        retry_after=None if n > burst else timedelta(seconds=wait),
                        quota=[FieldViolation(subject, "tasks submitted per second")],
                    )
        if limits.tenant_submit_rate:  # every tenant of the batch fits: now they pay
            for tenant, n in per_tenant.items():
                self._bucket(tenant).take(n)

    def _ahead_of(self, waiter: str) -> int:
        """Tasks that clients before `waiter` in line wait to submit (all, when it has no
        place); places that lapsed are dropped."""
        now = self._clock()
        ahead = 0
        for key, (n, lapses) in list(self._line.items()):
            if lapses < now:
                del self._line[key]
            elif key == waiter:
                break
            else:
                ahead += n
        return ahead

    def _hold_place(self, waiter: str, n: int, retry: timedelta) -> None:
        """Keep `waiter`'s place (or give it one at the end) until a while after its retry."""
        if not waiter or (waiter not in self._line and len(self._line) >= _MAX_WAITERS):
            return
        self._line[waiter] = (n, self._clock() + 2 * retry.total_seconds() + _RATE_WINDOW)

    def _retry_delay(self, excess: int) -> timedelta:
        """When `excess` tasks will have drained at the rate tasks finish now, jittered so
        that refused clients do not all come back at once."""
        now = self._clock()
        at, done, rate = self._sample
        if done < 0:  # the first refusal: measured from now on
            self._sample = (now, self._finished(), None)
        elif now - at >= _RATE_WINDOW:
            finished = self._finished()
            rate = (finished - done) / (now - at)
            self._sample = (now, finished, rate)
        if rate is None:  # not measured yet: back when it is
            wait = _RATE_WINDOW
        else:
            wait = excess / rate if rate > 0 else _RETRY.total_seconds()
        wait = min(_MAX_WAIT, max(_MIN_WAIT, wait)) * self._rng.uniform(0.8, 1.2)
        return timedelta(seconds=wait)

    def _bucket(self, tenant: str) -> TokenBucket:
        bucket = self._buckets.get(tenant)
        if bucket is None:
            rate = self._limits.tenant_submit_rate
            burst = self._limits.tenant_submit_burst or max(1.0, rate)
            bucket = self._buckets[tenant] = TokenBucket(rate, burst, clock=self._clock)
        return bucket
