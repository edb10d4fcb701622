"""The rows a store reads and writes: plain values, no protobuf (the core converts)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "ANY_TASK",
    "LABEL_CHARS",
    "FinishedRow",
    "Request",
    "StoredTask",
    "TaskFilter",
    "TaskRow",
    "TokenRow",
    "Unfinished",
    "UsageRow",
]


LABEL_CHARS = 256
"""The longest label key or value the filter index holds (a longer one is not indexed: an
index entry is bounded in size, and a metadata value need not be short)."""


@dataclass(frozen=True, slots=True)
class Request:
    """A submit call that may be resent: its key, and its tasks' rows' first seq and count.

    The rows of one request have consecutive seqs, so this is all it takes to find its tasks
    again (one small row per call, however many tasks it held).
    """

    key: str  # the caller's request id, scoped to the caller
    created_at: float


@dataclass(frozen=True, slots=True)
class UsageRow:
    """What a quota key used in a period ("2026-11-22", "2026-11"): added up by the store."""

    key: str
    period: str
    requests: int
    tokens: int
    cost: float


@dataclass(slots=True)
class TaskRow:
    """The acceptance record of a task."""

    seq: int  # sequence number of its acceptance event; also its arrival order
    id: str
    idempotency_key: str | None
    tenant: str
    priority: int
    spec: bytes  # a serialised shoal.v1.TaskSpec
    created_at: float
    submitted_by: str = ""
    # Upstream tasks: ids, or (when inserting) indexes into the same insert's rows.
    depends_on: list[str | int] = field(default_factory=list)
    # For a task that asks nothing unusual: what it needs of a node, so a restart can queue it
    # without parsing its spec (the core's to read and write; None for any other task).
    placement: str | None = None
    executor: str = ""  # the executor's name, for List's filter
    # (key, value) of its required labels and metadata, for List's filter (written, not read).
    labels: list[tuple[str, str]] = field(default_factory=list)


Unfinished = tuple[int, str, bytes, float, str, "list[str] | None", "str | None", int, str]
"""A task to recover: (seq, id, spec, created_at, submitted_by, depends_on: None for none,
placement, priority, tenant). Plain tuples, as SQLite returns them: a restart reads a
million."""


@dataclass(slots=True)
class FinishedRow:
    """The outcome record of a task."""

    id: str
    state: int
    final_seq: int
    finished_at: float
    started_at: float | None
    node_id: str
    attempt_epoch: int
    attempt_number: int
    result: bytes  # a serialised shoal.v1.TaskResult
    finished_by: str = ""
    attempts: bytes = b""  # earlier attempts: a serialised shoal.v1.Task with only `attempts`
    seq: int = 0  # its acceptance number: the row to update (0 in rows read back)


@dataclass(frozen=True, slots=True)
class TaskFilter:
    """What List asks of tasks beyond state and tenant: all must hold."""

    executor: str = ""
    labels: tuple[tuple[str, str], ...] = ()  # each (key, value) among its labels or metadata
    created_after: float | None = None  # inclusive
    created_before: float | None = None  # exclusive


ANY_TASK = TaskFilter()
"""The filter every task passes."""


@dataclass(slots=True)
class TokenRow:
    """An API token as stored: never its secret, only a hash of it."""

    id: str
    name: str
    role: str
    tenant: str
    node_id: str
    executors: list[str]
    labels: dict[str, str]
    secret_hash: bytes
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    created_by: str


@dataclass(slots=True)
class StoredTask:
    """A task as the store knows it; `outcome` is None while it is unfinished."""

    row: TaskRow
    outcome: FinishedRow | None
