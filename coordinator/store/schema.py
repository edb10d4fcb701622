"""The SQLite schema of the store, its migrations, and how a row is read back."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from shoal.coordinator.store.rows import FinishedRow, StoredTask, TaskRow

__all__ = ["COLUMNS", "TOKEN_COLUMNS", "migrate", "stored_task"]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    idempotency_key TEXT UNIQUE,
    tenant TEXT NOT NULL,
    priority INTEGER NOT NULL,
    spec BLOB NOT NULL,
    created_at REAL NOT NULL,
    state INTEGER,
    final_seq INTEGER,
    finished_at REAL,
    started_at REAL,
    node_id TEXT,
    attempt_epoch INTEGER,
    attempt_number INTEGER,
    result BLOB,
    submitted_by TEXT NOT NULL DEFAULT '',
    finished_by TEXT,
    depends_on TEXT NOT NULL DEFAULT '[]',
    attempts BLOB,
    placement TEXT
);
CREATE INDEX IF NOT EXISTS tasks_final_seq ON tasks(final_seq) WHERE final_seq IS NOT NULL;
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    tenant TEXT NOT NULL,
    node_id TEXT NOT NULL,
    executors TEXT NOT NULL,
    labels TEXT NOT NULL,
    secret_hash BLOB NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    revoked_at REAL,
    created_by TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS schedules (name TEXT PRIMARY KEY, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS members (node_id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS node_attempts (node_id TEXT PRIMARY KEY, attempts TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dispatched (node_id TEXT NOT NULL, attempts TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    key TEXT PRIMARY KEY, first_seq INTEGER NOT NULL, count INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_by_time ON requests (created_at);
CREATE TABLE IF NOT EXISTS quotas (key TEXT PRIMARY KEY, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS lock_tokens (name TEXT PRIMARY KEY, token INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT NOT NULL, token INTEGER NOT NULL, body BLOB NOT NULL, PRIMARY KEY (name, token)
);
-- What List filters on and Get(include_dependents) reads: each task's labels and metadata
-- entries, and each dependency edge (an upstream id and its downstream task's seq).
CREATE TABLE IF NOT EXISTS task_labels (
    key TEXT NOT NULL, value TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (key, value, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS task_edges (
    upstream TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (upstream, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage (
    key TEXT NOT NULL, period TEXT NOT NULL, requests INTEGER NOT NULL, tokens INTEGER NOT NULL,
    cost REAL NOT NULL, PRIMARY KEY (key, period)
);
"""

# Columns added after the first release: (table, column, definition).
_ADDED_COLUMNS = (
    ("tasks", "submitted_by", "TEXT NOT NULL DEFAULT ''"),
    ("tasks", "finished_by", "TEXT"),
    ("tasks", "depends_on", "TEXT NOT NULL DEFAULT '[]'"),
    ("tasks", "attempts", "BLOB"),
    ("tasks", "placement", "TEXT"),
    ("tasks", "executor", "TEXT"),
)

# Made after the columns they cover exist.
_INDEXES = "CREATE INDEX IF NOT EXISTS tasks_executor ON tasks (executor, seq);"

# Edges of the tasks stored before task_edges existed, from their depends_on lists.
_EDGES_BACKFILL = (
    "INSERT OR IGNORE INTO task_edges (upstream, seq) SELECT j.value, t.seq"
    " FROM tasks t, json_each(t.depends_on) j WHERE t.depends_on != '[]'"
)

COLUMNS = (
    "seq, id, idempotency_key, tenant, priority, spec, created_at, state, final_seq,"
    " finished_at, started_at, node_id, attempt_epoch, attempt_number, result,"
    " submitted_by, finished_by, depends_on, attempts"
)
TOKEN_COLUMNS = (
    "id, name, role, tenant, node_id, executors, labels, secret_hash, created_at, expires_at,"
    " revoked_at, created_by"
)


def stored_task(r: tuple[Any, ...]) -> StoredTask:
    row = TaskRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[15], json.loads(r[17]))
    outcome = None
    if r[8] is not None:
        outcome = FinishedRow(
            r[1],
            r[7],
            r[8],
            r[9],
            r[10],
            r[11] or "",
            r[12],
            r[13],
            r[14],
            r[16] or "",
            r[18] or b"",
        )
    return StoredTask(row, outcome)


def migrate(conn: sqlite3.Connection) -> None:
    had_tasks, had_edges = (
        conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (name,)).fetchone() is not None
        for name in ("tasks", "task_edges")
    )
    conn.executescript(_SCHEMA)
    for table, column, definition in _ADDED_COLUMNS:
        have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
    conn.executescript(_INDEXES)
    if had_tasks and not had_edges:
        conn.execute(_EDGES_BACKFILL)
