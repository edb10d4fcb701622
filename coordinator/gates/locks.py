"""Locks: named, exclusive or shared, held by tasks while they run or by leases from outside.

A task declares its locks (`file:/x` exclusive, `read:file:/x` shared) and takes all of them
at once when it is dispatched, or none and waits: no task ever holds one lock while waiting for
another, so there is no deadlock. A lease (the Locks API) holds a lock until it is released or
its time ends, and carries a fencing token that grows with every lease of the name.
Shared holders may join while a task waits for the exclusive lock (readers are not held back
behind a waiting writer).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from shoal.auth import Principal, Role
from shoal.coordinator.clock import Clock
from shoal.coordinator.gates.base import Admission, Refusal
from shoal.coordinator.gates.keys import lock_key
from shoal.coordinator.records import TaskRecord
from shoal.coordinator.store import Store
from shoal.coordinator.timers import SetTimer, TimerKind
from shoal.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from shoal.specs import timestamp
from shoal.v1 import locks_pb2, task_pb2

__all__ = ["LeaseTable", "LockGate", "parse_locks", "tenant_lock"]

_log = logging.getLogger("shoal.coordinator")

_SHARED = "read:"


def tenant_lock(name: str, tenant: str) -> str:
    """The lock `name` as a tenant's task or principal means it: within its tenant (named in
    full, `tenant/<tenant>/<name>`, as its leases are), so tenants never hold or block each
    other's locks. A principal of every tenant names any lock in full."""
    if not tenant:
        return name
    prefix = f"tenant/{tenant}/"
    return name if name.startswith(prefix) else prefix + name


def parse_locks(names: Iterable[str], tenant: str = "") -> tuple[tuple[str, bool], ...]:
    """(name, shared) per declared lock, within `tenant`; a name declared twice counts once,
    exclusive first."""
    wanted: dict[str, bool] = {}
    for declared in names:
        shared = declared.startswith(_SHARED)
        name = declared.removeprefix(_SHARED) if shared else declared
        if not name:
            raise InvalidArgument(f"lock {declared!r} names nothing")
        name = tenant_lock(name, tenant)
        wanted[name] = wanted.get(name, True) and shared
    return tuple(sorted(wanted.items()))


@dataclass
class _Lock:
    exclusive: str = ""  # its holder (a task id or "lease:<token>")
    shared: set[str] = field(default_factory=set)

    def blocks(self, shared: bool) -> bool:
        return bool(self.exclusive) or (not shared and bool(self.shared))

    def holders(self) -> str:
        if self.exclusive:
            return f"{_who(self.exclusive)} (exclusive)"
        some = ", ".join(sorted(_who(h) for h in self.shared)[:3])
        return f"{len(self.shared)} shared holder(s): {some}"


def _who(holder: str) -> str:
    return holder.replace("lease:", "lease ") if holder.startswith("lease:") else f"task {holder}"


@dataclass
class LockGate(Admission):
    """Who holds which lock; a gate at dispatch for the tasks that declare locks."""

    _locks: dict[str, _Lock] = field(default_factory=dict)
    _held: dict[str, tuple[tuple[str, bool], ...]] = field(default_factory=dict)

    def keys(self, rec: TaskRecord) -> list[str]:
        return [lock_key(name) for name, _ in rec.locks]

    def conflict(self, wanted: tuple[tuple[str, bool], ...]) -> Refusal | None:
        for name, shared in wanted:
            lock = self._locks.get(name)
            if lock is not None and lock.blocks(shared):
                return Refusal(lock_key(name), f"lock {name} is held by {lock.holders()}")
        return None

    def hold(self, holder: str, wanted: tuple[tuple[str, bool], ...]) -> None:
        for name, shared in wanted:
            lock = self._locks.setdefault(name, _Lock())
            if shared:
                lock.shared.add(holder)
            else:
                lock.exclusive = holder
        self._held[holder] = wanted

    def release(self, holder: str) -> list[str]:
        """Let go of everything `holder` holds; returns the waiting keys it freed."""
        wanted = self._held.pop(holder, ())
        for name, shared in wanted:
            lock = self._locks[name]
            if shared:
                lock.shared.discard(holder)
            elif lock.exclusive == holder:
                lock.exclusive = ""
            if not lock.exclusive and not lock.shared:
                del self._locks[name]
        return [lock_key(name) for name, _ in wanted]

    def take(self, rec: TaskRecord, now: float) -> Refusal | None:
        if not rec.locks:
            return None
        refusal = self.conflict(rec.locks)
        if refusal is None:
            self.hold(rec.id, rec.locks)
        return refusal

    def give_back(
        self, rec: TaskRecord, result: task_pb2.TaskResult | None, now: float
    ) -> list[str]:
        return self.release(rec.id) if rec.locks else []

    def holding(self, name: str) -> bool:
        return name in self._locks


def _holder(lease: locks_pb2.Lease) -> str:
    return f"lease:{lease.name}#{lease.token}"


class LeaseTable:
    """Locks held from outside the mesh: leases in the gate, in the store and on a timer."""

    def __init__(
        self,
        store: Store,
        gate: LockGate,
        *,
        set_timer: SetTimer,
        cancel_timer: Callable[[TimerKind, str], None],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        wake: Callable[[str], None],
        clock: Clock,
        max_name: int,
        max_ttl: timedelta = timedelta(hours=1),
    ) -> None:
        self._store = store
        self._gate = gate
        self._set_timer = set_timer
        self._cancel_timer = cancel_timer
        self._spawn = spawn
        self._wake = wake  # a freed key's waiting tasks go on
        self._clock = clock
        self._max_name = max_name
        self._max_ttl = max_ttl
        self._leases: dict[str, locks_pb2.Lease] = {}  # by holder, "lease:<name>#<token>"
        self._tokens: dict[str, int] = {}  # the last fencing token of each name
        self._freed: dict[str, asyncio.Event] = {}  # leases waiting for a lock, by key

    async def load(self) -> None:
        """Take the stored fencing tokens and the leases not yet expired (at start-up)."""
        self._tokens = await self._store.lock_tokens()
        for body in await self._store.leases():
            lease = locks_pb2.Lease.FromString(body)
            expires = lease.expires_at.ToNanoseconds() / 1e9  # wall time when it was stored
            if expires > self._clock.wall():
                self._start(
                    lease, self._clock.remaining(expires, most=self._max_ttl.total_seconds())
                )

    async def acquire(
        self, name: str, ttl: timedelta, wait: timedelta, *, shared: bool, by: Principal
    ) -> locks_pb2.Lease:
        """Take a lock for `ttl`, waiting up to `wait` for it; FailedPrecondition if held.
        A principal of one tenant takes the lock of that name within its tenant."""
        if not name or len(name) > self._max_name or not name.isprintable():
            raise InvalidArgument(
                f"a lock needs a printable name of at most {self._max_name} characters"
            )
        self._check_ttl(ttl)
        name = tenant_lock(name, by.tenant)
        wanted = ((name, shared),)
        reason = ""
        try:
            async with asyncio.timeout(wait.total_seconds()):
                while (refusal := self._gate.conflict(wanted)) is not None:
                    reason = refusal.reason
                    await self._freed.setdefault(refusal.key, asyncio.Event()).wait()
        except TimeoutError:
            raise FailedPrecondition(reason) from None
        token = self._tokens.get(name, 0) + 1
        self._tokens[name] = token
        lease = locks_pb2.Lease(
            name=name,
            token=token,
            expires_at=timestamp(self._clock.wall() + ttl.total_seconds()),
            shared=shared,
            holder=by.name,
        )
        # Held from here on: nothing else can take it meanwhile.
        self._start(lease, self._clock.now() + ttl.total_seconds())
        try:
            await self._store.put_lease(name, token, lease.SerializeToString())
        except BaseException:
            self._end(_holder(lease))
            raise
        return lease

    async def renew(
        self, name: str, token: int, ttl: timedelta, *, by: Principal
    ) -> locks_pb2.Lease:
        self._check_ttl(ttl)
        lease = self._lease(name, token, by)
        lease.expires_at.CopyFrom(timestamp(self._clock.wall() + ttl.total_seconds()))
        self._set_timer(TimerKind.LEASE, _holder(lease), self._clock.now() + ttl.total_seconds())
        await self._store.put_lease(lease.name, token, lease.SerializeToString())
        return lease

    async def release(self, name: str, token: int, *, by: Principal) -> locks_pb2.Lease:
        lease = self._lease(name, token, by)
        await self._store.delete_lease(lease.name, token)  # first: a failed delete changes nothing
        self._end(_holder(lease))
        return lease

    def expire(self, holder: str) -> None:
        """The lease's timer is due: it ends."""
        if (lease := self._leases.get(holder)) is not None:
            _log.info("lease %s #%d expired", lease.name, lease.token)
            self._end(holder, expired=True)

    def freed(self, key: str) -> None:
        """`key` was let go of: a lease waiting for it tries again."""
        if (event := self._freed.pop(key, None)) is not None:
            event.set()

    def _check_ttl(self, ttl: timedelta) -> None:
        if ttl <= timedelta(0):
            raise InvalidArgument("ttl must be positive")
        if ttl > self._max_ttl:
            raise InvalidArgument(
                f"ttl is at most {self._max_ttl.total_seconds():g} s (max_lock_ttl): renew the"
                " lease to hold it longer"
            )

    def _lease(self, name: str, token: int, by: Principal) -> locks_pb2.Lease:
        name = tenant_lock(name, by.tenant)
        lease = self._leases.get(_holder(locks_pb2.Lease(name=name, token=token)))
        if lease is None:
            raise FailedPrecondition(f"lease {name} #{token} has ended (expired or released)")
        if lease.holder != by.name and by.role is not Role.ADMIN:
            raise PermissionDenied(f"lease {name} #{token} is held by {lease.holder!r}")
        return lease

    def _start(self, lease: locks_pb2.Lease, due: float) -> None:
        """Hold the lease until steady time `due` (its TTL's end)."""
        holder = _holder(lease)
        self._leases[holder] = lease
        self._tokens[lease.name] = max(self._tokens.get(lease.name, 0), lease.token)
        self._gate.hold(holder, ((lease.name, lease.shared),))
        self._set_timer(TimerKind.LEASE, holder, due)

    def _end(self, holder: str, *, expired: bool = False) -> None:
        lease = self._leases.pop(holder, None)
        if lease is None:
            return
        self._cancel_timer(TimerKind.LEASE, holder)
        if expired:  # not released: its row goes too
            self._spawn(self._store.delete_lease(lease.name, lease.token))
        for key in self._gate.release(holder):
            self._wake(key)
