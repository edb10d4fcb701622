"""Whether a failed attempt is tried again, and after how long. Pure: no clock, no I/O."""

from __future__ import annotations

import random

from shoal.v1 import task_pb2

__all__ = ["retry_delay"]

_DEFAULT_INITIAL = 1.0
_DEFAULT_MAX = 60.0
_DEFAULT_MULTIPLIER = 2.0


def _retryable(policy: task_pb2.RetryPolicy, state: int, result: task_pb2.TaskResult) -> bool:
    if result.infrastructure_failure:
        return not policy.no_retry_on_infrastructure
    if state == task_pb2.TASK_STATE_TIMED_OUT:
        return policy.retry_on_timeout
    if state == task_pb2.TASK_STATE_FAILED and policy.retry_on_exit:
        return not policy.retry_exit_codes or result.exit_code in policy.retry_exit_codes
    return False


def retry_delay(
    policy: task_pb2.RetryPolicy,
    attempts_made: int,
    state: int,
    result: task_pb2.TaskResult,
    rng: random.Random,
) -> float | None:
    """Seconds to wait before the next attempt, or None when this outcome is final.

    `attempts_made` counts the attempt that just ended. The delay grows exponentially from
    `initial_backoff` by `multiplier` up to `max_backoff`, with "equal jitter": half of it
    fixed, half random, so retries of many tasks spread out but never come early.
    """
    if attempts_made >= policy.max_attempts or not _retryable(policy, state, result):
        return None
    initial = (
        policy.initial_backoff.ToNanoseconds() / 1e9
        if policy.HasField("initial_backoff")
        else _DEFAULT_INITIAL
    )
    cap = (
        policy.max_backoff.ToNanoseconds() / 1e9 if policy.HasField("max_backoff") else _DEFAULT_MAX
    )
    try:
        grown = initial * (policy.multiplier or _DEFAULT_MULTIPLIER) ** (attempts_made - 1)
    except OverflowError:
        grown = cap
    delay = min(cap, grown)
    return delay / 2 + rng.uniform(0, delay / 2)
