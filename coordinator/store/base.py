"""The Store interface: where accepted tasks and outcomes live, whatever the backend.

Two records per task reach the disk: its acceptance and its outcome. Everything in
between (assignment, start, progress) lives in memory, since execution is at-least-once
and a restart simply queues every unfinished task again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence

from shoal.coordinator.store.rows import (
    ANY_TASK,
    FinishedRow,
    Request,
    StoredTask,
    TaskFilter,
    TaskRow,
    TokenRow,
    Unfinished,
    UsageRow,
)

__all__ = ["EPOCH_SHIFT", "REQUEST_RETENTION", "STORE_FULL", "Store"]

EPOCH_SHIFT = 40
"""Sequence numbers are `(epoch << EPOCH_SHIFT) | counter`: they keep growing across restarts."""

REQUEST_RETENTION = 3600.0
"""Seconds a request id is remembered: resends come within seconds or minutes."""

STORE_FULL = "the store cannot write: disk full"


class Store(ABC):
    """Where accepted tasks and outcomes live; every write returns after it is durable."""

    @abstractmethod
    async def open(self) -> int:
        """Open the store and durably start a new epoch, returning it."""

    @abstractmethod
    async def close(self) -> None:
        """Flush pending writes and close; idempotent."""

    @abstractmethod
    async def insert(
        self, rows: Sequence[TaskRow], request: Request | None = None
    ) -> tuple[list[str | None], list[list[str]]]:
        """Insert atomically; per row None, or the id of the task already holding its key.

        Also returns each row's upstream ids, batch indexes resolved to the final ids (an
        existing task's id where a key matched). With `request`, a request already stored
        under its key inserts nothing and answers with the ids the first one got (every row
        then has an id); FailedPrecondition if it held another number of tasks.
        """

    @abstractmethod
    async def finish(self, rows: Sequence[FinishedRow]) -> None:
        """Record outcomes."""

    @abstractmethod
    def unfinished(self) -> AsyncIterator[list[Unfinished]]:
        """Every accepted task without an outcome, in arrival order: page by page."""

    @abstractmethod
    async def get(self, task_id: str) -> StoredTask | None:
        """One task by id."""

    @abstractmethod
    async def list_tasks(
        self,
        *,
        before_seq: int | None,
        tenant: str | None,
        final_states: Sequence[int] | None,
        include_unfinished: bool,
        limit: int,
        only: TaskFilter = ANY_TASK,
    ) -> list[StoredTask]:
        """Tasks newest first; `final_states` None means any outcome; `only` filters further
        (a label or executor by its index: a page costs what it holds, not what it skips)."""

    @abstractmethod
    async def dependents(self, task_id: str, limit: int) -> list[tuple[str, str]]:
        """(id, tenant) of the tasks that depend on `task_id`, in arrival order: at most
        `limit`, finished or not."""

    @abstractmethod
    async def events_between(
        self, after: int, before: int, limit: int
    ) -> list[tuple[int, StoredTask]]:
        """Acceptances and outcomes with a sequence number in (after, before), in order.

        Each item is (seq, task): the task's acceptance when seq == task.row.seq, else its outcome.
        """

    @abstractmethod
    async def tokens(self) -> list[TokenRow]:
        """Every token, revoked ones included."""

    @abstractmethod
    async def put_token(self, row: TokenRow) -> None:
        """Store a new token."""

    @abstractmethod
    async def revoke_token(self, token_id: str, at: float) -> None:
        """Mark a token revoked."""

    @abstractmethod
    async def schedules(self) -> list[bytes]:
        """Every schedule: serialised shoal.v1.Schedule messages."""

    @abstractmethod
    async def put_schedule(self, name: str, body: bytes) -> None:
        """Create or replace a schedule."""

    @abstractmethod
    async def delete_schedule(self, name: str) -> None:
        """Remove a schedule (nothing when it does not exist)."""

    @abstractmethod
    async def quotas(self) -> list[bytes]:
        """Every quota: serialised shoal.v1.Quota messages."""

    @abstractmethod
    async def put_quota(self, key: str, body: bytes) -> None:
        """Create or replace the quota on a key."""

    @abstractmethod
    async def delete_quota(self, key: str) -> None:
        """Remove the quota on a key (nothing when there is none)."""

    @abstractmethod
    async def usage(self) -> list[UsageRow]:
        """What each key used, per period."""

    @abstractmethod
    async def add_usage(self, deltas: Sequence[UsageRow]) -> None:
        """Add to what keys used."""

    @abstractmethod
    async def leases(self) -> list[bytes]:
        """Every lock lease held: serialised shoal.v1.Lease messages."""

    @abstractmethod
    async def lock_tokens(self) -> dict[str, int]:
        """The last fencing token handed out for each lock name."""

    @abstractmethod
    async def put_lease(self, name: str, token: int, body: bytes) -> None:
        """Record (or renew) a lease; its token becomes the name's last."""

    @abstractmethod
    async def delete_lease(self, name: str, token: int) -> None:
        """Forget a lease (its token stays the name's last)."""

    @abstractmethod
    async def members(self) -> list[str]:
        """The nodes that held a session when the coordinator last ran."""

    @abstractmethod
    async def set_member(self, node_id: str, member: bool) -> None:
        """Record that a node holds a session (True) or no longer does (False, which also
        forgets its attempts)."""

    @abstractmethod
    async def node_attempts(self) -> dict[str, str]:
        """What put_node_attempts last recorded of each node, by node id, followed by the
        lines add_dispatched recorded of it since (so a task's later attempt comes later)."""

    @abstractmethod
    async def put_node_attempts(self, attempts: Mapping[str, str]) -> None:
        """Record the attempts each node was dispatched and still runs (the core's text); what
        add_dispatched recorded before is covered by it, and forgotten. It rides along with
        the next group commit (see Writer)."""

    @abstractmethod
    def add_dispatched(self, attempts: Mapping[str, str]) -> Awaitable[None]:
        """Record attempts just dispatched to each node (the core's text), queued with the
        next group commit at once: a node can then reclaim them after a crash soon after.
        (It does not ride along: a task seen running must not run again after a crash.)"""
