"""Durable task storage: the `Store` interface (base), its row types (rows) and the embedded
SQLite backend (sqlite), with the marks, directory lock and checks the SQLite files use."""

from shoal.coordinator.store.base import EPOCH_SHIFT, REQUEST_RETENTION, STORE_FULL, Store
from shoal.coordinator.store.rows import (
    LABEL_CHARS,
    FinishedRow,
    Request,
    StoredTask,
    TaskFilter,
    TaskRow,
    TokenRow,
    Unfinished,
    UsageRow,
)
from shoal.coordinator.store.sqlite import SqliteStore

__all__ = [
    "EPOCH_SHIFT",
    "LABEL_CHARS",
    "REQUEST_RETENTION",
    "STORE_FULL",
    "FinishedRow",
    "Request",
    "SqliteStore",
    "Store",
    "StoredTask",
    "TaskFilter",
    "TaskRow",
    "TokenRow",
    "Unfinished",
    "UsageRow",
]
