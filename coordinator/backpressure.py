"""Backpressure on submits: caps on unfinished tasks, in all and per tenant, and tenant rates."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import timedelta

from shoal.coordinator.ratelimit import TokenBucket
from shoal.coordinator.validation import Limits
from shoal.errors import FieldViolation, ResourceExhausted
from shoal.v1 import task_pb2

__all__ = ["Backpressure"]

_RETRY = timedelta(seconds=1)


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
    ) -> None:
        self._limits = limits
        self._unfinished = unfinished
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}  # per tenant

    def reserve(self, specs: Sequence[task_pb2.TaskSpec]) -> Counter[str]:
        """Count `specs` as unfinished at once (per tenant, returned for `release`), or raise
        ResourceExhausted, with a retry delay, beyond the unfinished-task caps or rates.

        Reserving before the caller awaits makes the caps hard: batches submitted at once
        each see the others.
        """
        per_tenant = Counter(spec.tenant for spec in specs)
        self._check(len(specs), per_tenant)
        self._unfinished.update(per_tenant)
        return per_tenant

    def release(self, reserved: Counter[str]) -> None:
        """Give back what `reserve` counted, for tasks that were not created."""
        self._unfinished.subtract(reserved)

    def _check(self, count: int, per_tenant: Counter[str]) -> None:
        limits = self._limits
        total = sum(self._unfinished.values())
        if total + count > limits.max_queued:
            raise ResourceExhausted(
                f"{total} tasks are unfinished; the limit is {limits.max_queued}",
                retry_after=_retry_unless(count > limits.max_queued),
            )
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

    def _bucket(self, tenant: str) -> TokenBucket:
        bucket = self._buckets.get(tenant)
        if bucket is None:
            rate = self._limits.tenant_submit_rate
            burst = self._limits.tenant_submit_burst or max(1.0, rate)
            bucket = self._buckets[tenant] = TokenBucket(rate, burst, clock=self._clock)
        return bucket
