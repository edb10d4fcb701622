"""Quotas: limits on the keys tasks carry, enforced mesh-wide when a task is dispatched.

A task counts against its own `quota_keys` and the automatic ones (tenant:, executor:,
model:, backend:). A key's Quota may cap its rate (a token bucket), its concurrency, its
dispatches per day, its LLM tokens per minute and per day, and its cost per day and month.
Tokens and cost are reserved from the task's estimate at dispatch and replaced by what it
reports when it ends, so overspend is at most the reservations in flight. Periods are UTC
calendar windows. Used amounts are handed to the caller to persist (`unsaved`), and `restore`
loads them back after a restart; rate buckets start empty after a restart, never full.
"""

from __future__ import annotations

import calendar
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from shoal.coordinator.gates.base import Admission, Refusal
from shoal.coordinator.gates.keys import quota_key
from shoal.coordinator.gates.ratelimit import TokenBucket
from shoal.coordinator.records import TaskRecord
from shoal.coordinator.store import UsageRow
from shoal.errors import InvalidArgument
from shoal.specs import executor_of
from shoal.v1 import admin_pb2, task_pb2

__all__ = ["Pricing", "QuotaGate", "auto_keys", "check_quota"]

Pricing = Mapping[str, tuple[float, float]]
"""Dollars per million prompt and completion tokens, by model."""


def auto_keys(spec: task_pb2.TaskSpec) -> list[str]:
    """The keys the coordinator adds to every task."""
    return _auto_keys(executor_of(spec), spec.tenant, spec.model, spec.backend)


def _auto_keys(executor: str, tenant: str, model: str, backend: str) -> list[str]:
    keys = [f"executor:{executor}"]
    if tenant:
        keys.append(f"tenant:{tenant}")
    if model:
        keys.append(f"model:{model}")
    if backend:
        keys.append(f"backend:{backend}")
    return keys


_Kind = tuple[str, str, str, str]
"""What decides a task's automatic keys: its executor, tenant, model and backend."""


def check_quota(q: admin_pb2.Quota, max_string: int) -> None:
    if not q.key or len(q.key) > max_string or not q.key.isprintable():
        raise InvalidArgument(f"a quota needs a printable key of at most {max_string} characters")
    numbers = (q.rate, q.cost_per_day, q.cost_per_month)
    if any(x < 0 or x != x or x == float("inf") for x in numbers):
        raise InvalidArgument("rate and costs must be finite and not negative")
    if q.per.seconds < 0 or q.per.nanos < 0:
        raise InvalidArgument("per must not be negative")


@dataclass
class _Use:
    requests: int = 0
    tokens: int = 0
    cost: float = 0.0

    def add(self, other: _Use, sign: int = 1) -> None:
        self.requests += sign * other.requests
        self.tokens += sign * other.tokens
        self.cost += sign * other.cost


@dataclass
class _Held:
    """What a dispatched task holds until its attempt ends."""

    keys: list[str]
    periods: list[str]  # day, month, minute at dispatch
    use: _Use
    model: str = ""


def _periods(now: float) -> list[str]:
    t = time.gmtime(now)
    return [
        time.strftime("%Y-%m-%d", t),
        time.strftime("%Y-%m", t),
        time.strftime("%Y-%m-%dT%H:%M", t),
    ]


def _period_end(now: float, kind: int) -> float:
    """When the day (0), month (1) or minute (2) that holds `now` ends (UTC)."""
    t = time.gmtime(now)
    if kind == 2:
        return (now // 60 + 1) * 60
    if kind == 0:
        return (now // 86400 + 1) * 86400
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))


@dataclass
class QuotaGate(Admission):
    """The quota limits and counters; `take`/`give_back` at dispatch and at the end."""

    pricing: Pricing = field(default_factory=dict)
    _limits: dict[str, admin_pb2.Quota] = field(default_factory=dict)
    _buckets: dict[str, TokenBucket] = field(default_factory=dict)
    _running: Counter[str] = field(default_factory=Counter)
    _used: dict[tuple[str, str], _Use] = field(default_factory=dict)  # ended attempts
    _reserved: dict[tuple[str, str], _Use] = field(default_factory=dict)  # in flight
    _held: dict[str, _Held] = field(default_factory=dict)
    _unsaved: dict[tuple[str, str], _Use] = field(default_factory=dict)  # added up per key
    # Runs that held no quota, by kind of task, since `_tally_day` (days since the epoch): per
    # task one Counter increment; they are added to each of their keys when usage is read or
    # saved.
    _tally: Counter[_Kind] = field(default_factory=Counter)
    _tally_day: int = -1
    _minute: str = ""
    clock: Callable[[], float] = time.monotonic  # for rate limits; periods are dates

    @property
    def active(self) -> bool:
        """Whether any limit is set: without one, dispatch skips the gate entirely."""
        return bool(self._limits)

    # -- limits ------------------------------------------------------------------------------

    def set(self, quota: admin_pb2.Quota) -> None:
        self._limits[quota.key] = quota
        self._buckets.pop(quota.key, None)
        if quota.rate:
            per = quota.per.ToNanoseconds() / 1e9 or 1.0
            burst = quota.burst or max(1, int(quota.rate))
            bucket = TokenBucket(quota.rate / per, burst, clock=self.clock)
            bucket.take(burst)  # it starts empty: a new or restored limit grants no burst
            self._buckets[quota.key] = bucket

    def get(self, key: str) -> admin_pb2.Quota | None:
        return self._limits.get(key)

    def delete(self, key: str) -> admin_pb2.Quota | None:
        self._buckets.pop(key, None)
        return self._limits.pop(key, None)

    def quotas(self) -> list[admin_pb2.Quota]:
        return [self._limits[k] for k in sorted(self._limits)]

    def restore(self, rows: Iterable[UsageRow]) -> None:
        """Usage stored before a restart."""
        for d in rows:
            self._used.setdefault((d.key, d.period), _Use()).add(_Use(d.requests, d.tokens, d.cost))

    # -- dispatch ----------------------------------------------------------------------------

    def _limited(self, spec: task_pb2.TaskSpec) -> list[str]:
        """The spec's keys that have a limit."""
        if not self._limits:
            return []
        return [k for k in (*spec.quota_keys, *auto_keys(spec)) if k in self._limits]

    def _need(self, spec: task_pb2.TaskSpec) -> _Use:
        """What one run of the spec is expected to use: one request and its estimate."""
        e = spec.estimate
        return _Use(1, e.prompt_tokens + e.completion_tokens, e.cost or self._price(e))

    def _periods_now(self, now: float) -> list[str]:
        periods = _periods(now)
        self._roll(periods[2])
        return periods

    def keys(self, rec: TaskRecord) -> list[str]:
        return [quota_key(k) for k in self._limited(rec.spec)]

    def take(self, rec: TaskRecord, now: float) -> Refusal | None:
        keys = self._limited(rec.spec)
        if not keys:
            return None
        periods = self._periods_now(now)
        need = self._need(rec.spec)
        for key in keys:
            refusal = self._check(self._limits[key], periods, need, now)
            if refusal is not None:
                return refusal
        waits = [(self._buckets[k].wait(), k) for k in keys if k in self._buckets]
        if waits and (worst := max(waits))[0] > 0:
            wait, key = worst
            q = self._limits[key]
            return Refusal(
                quota_key(key),
                f"rate limit {key}: next slot in {wait:.1f} s",
                retry_after=wait,
                fail=q.fail_fast,
            )
        for key in keys:
            if key in self._buckets:
                self._buckets[key].take()
            self._running[key] += 1
            for period in periods:
                self._reserved.setdefault((key, period), _Use()).add(need)
        self._held[rec.id] = _Held(keys, periods, need, rec.spec.estimate.model or rec.spec.model)
        return None

    def spent(self, spec: task_pb2.TaskSpec, now: float) -> bool:
        """Whether a budget of the spec's keys (requests, tokens or dollars in a period) would
        refuse it now; rate and concurrency limits, which free up soon, do not count."""
        keys = self._limited(spec)
        if not keys:
            return False
        periods, need = self._periods_now(now), self._need(spec)
        return any(
            self._check(self._limits[k], periods, need, now, budgets_only=True) for k in keys
        )

    def _check(
        self,
        q: admin_pb2.Quota,
        periods: list[str],
        need: _Use,
        now: float,
        *,
        budgets_only: bool = False,
    ) -> Refusal | None:
        key = q.key
        day, month, minute = periods

        def refuse(what: str, kind: int | None) -> Refusal:
            at = None if kind is None else _period_end(now, kind)
            return Refusal(quota_key(key), f"{what} {key}", retry_at=at, fail=q.fail_fast)

        if not budgets_only and q.concurrency and self._running[key] >= q.concurrency:
            return refuse(f"concurrency limit ({q.concurrency} running) of", None)
        if q.requests_per_day and self._total(key, day).requests + 1 > q.requests_per_day:
            return refuse(f"{q.requests_per_day} requests a day used by", 0)
        for limit, period, kind, what in (
            (q.tokens_per_minute, minute, 2, "tokens a minute"),
            (q.tokens_per_day, day, 0, "tokens a day"),
        ):
            if limit and self._total(key, period).tokens + need.tokens > limit:
                return refuse(f"{limit} {what} used (or reserved) by", kind)
        for budget, period, kind, what in (
            (q.cost_per_day, day, 0, "a day"),
            (q.cost_per_month, month, 1, "a month"),
        ):
            if budget and self._total(key, period).cost + need.cost > budget:
                return refuse(f"budget of ${budget:g} {what} spent (or reserved) by", kind)
        return None

    def _total(self, key: str, period: str) -> _Use:
        total = _Use()
        for table in (self._used, self._reserved):
            if (use := table.get((key, period))) is not None:
                total.add(use)
        return total

    def _price(self, usage: task_pb2.Usage) -> float:
        prompt, completion = self.pricing.get(usage.model, (0.0, 0.0))
        return (usage.prompt_tokens * prompt + usage.completion_tokens * completion) / 1e6

    def ran(self, rec: TaskRecord, result: task_pb2.TaskResult, now: float) -> None:
        """An attempt that ran and held no quota: one request for each of its automatic keys
        (usage by executor, tenant, model and backend), and what it reports using for all."""
        if result.HasField("usage"):
            self._count(rec, result.usage, _periods(now)[:2], skip=())
            return
        day = int(now // 86400)
        if day != self._tally_day:
            self._fold()
            self._tally_day = day
        # From the record, not its spec: parsing a spec costs several times this whole call.
        cls = rec.placement.cls
        model = rec.spec.model if cls.provider else cls.model  # a cloud model is no placement's
        self._tally[cls.executor, rec.tenant, model, rec.backend] += 1

    def _fold(self) -> None:
        """The tallied runs, added to each of their keys for their day and month."""
        if not self._tally:
            return
        periods = _periods(self._tally_day * 86400)[:2]
        for kind, runs in self._tally.items():
            for key in _auto_keys(*kind):
                self._add_used(key, periods, _Use(runs))
        self._tally.clear()

    def _add_used(self, key: str, periods: Iterable[str], use: _Use) -> None:
        for period in periods:
            self._used.setdefault((key, period), _Use()).add(use)
            self._unsaved.setdefault((key, period), _Use()).add(use)

    def give_back(
        self, rec: TaskRecord, result: task_pb2.TaskResult | None, now: float
    ) -> list[str]:
        held = self._held.pop(rec.id, None)
        if held is None:
            if result is not None:
                self.ran(rec, result, now)
            return []
        self._roll(_periods(now)[2])
        actual = _Use()
        if result is not None:  # it ran: the request counts, with what it reports using
            usage = result.usage
            if not usage.model:
                usage.model = held.model
            actual = _Use(
                1, usage.prompt_tokens + usage.completion_tokens, usage.cost or self._price(usage)
            )
        for key in held.keys:
            self._running[key] -= 1
            if not self._running[key]:
                del self._running[key]
            for period in held.periods:
                self._reserved[key, period].add(held.use, -1)
                if not self._reserved[key, period].requests:
                    del self._reserved[key, period]
                if actual.requests and period == held.periods[2] == self._minute:
                    # Minutes pass too fast to be worth storing.
                    self._used.setdefault((key, period), _Use()).add(actual)
            if actual.requests:
                self._add_used(key, held.periods[:2], actual)
        if result is not None:
            if result.HasField("usage"):
                self._count(rec, result.usage, held.periods[:2], skip=held.keys)
            else:  # one request for its automatic keys without a quota
                for key in set(auto_keys(rec.spec)).difference(held.keys):
                    self._add_used(key, held.periods[:2], _Use(1))
        return [quota_key(k) for k in held.keys]

    def _count(
        self, rec: TaskRecord, usage: task_pb2.Usage, periods: list[str], skip: Iterable[str]
    ) -> None:
        """What a task reports using counts for its keys without a quota too (usage by
        tenant, model and backend)."""
        if not usage.model:
            usage.model = rec.spec.estimate.model or rec.spec.model
        used = _Use(
            1, usage.prompt_tokens + usage.completion_tokens, usage.cost or self._price(usage)
        )
        for key in {*rec.spec.quota_keys, *auto_keys(rec.spec)}.difference(skip):
            self._add_used(key, periods, used)

    def unsaved(self) -> list[UsageRow]:
        """Usage added since the last call, for the store: one row per key and period."""
        self._fold()
        out = [UsageRow(k, p, u.requests, u.tokens, u.cost) for (k, p), u in self._unsaved.items()]
        self._unsaved.clear()
        return out

    def _roll(self, minute: str) -> None:
        """A new minute: forget the per-minute usage of the previous ones."""
        if minute != self._minute:
            self._minute = minute
            for k in [k for k in self._used if "T" in k[1] and k[1] != minute]:
                del self._used[k]

    # -- reporting ---------------------------------------------------------------------------

    def usage(self, key: str = "") -> list[admin_pb2.KeyUsage]:
        self._fold()
        periods = {p for (_, p) in self._used} | {p for (_, p) in self._reserved}
        keys = {key} if key else {k for (k, _) in self._used} | set(self._limits)
        out = []
        for k in sorted(keys):
            for period in sorted(p for p in periods if "T" not in p):
                used = self._used.get((k, period), _Use())
                reserved = self._reserved.get((k, period), _Use())
                if not (used.requests or reserved.requests):
                    continue
                out.append(
                    admin_pb2.KeyUsage(
                        key=k,
                        period=period,
                        requests=used.requests,
                        tokens=used.tokens,
                        cost=used.cost,
                        running=self._running[k],
                        reserved_tokens=reserved.tokens,
                        reserved_cost=reserved.cost,
                    )
                )
        return out
