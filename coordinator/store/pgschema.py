"""The PostgreSQL schema of the store: numbered migrations, run at start under a lock."""

from __future__ import annotations

from typing import Any

import psycopg

__all__ = ["MIGRATIONS", "migrate"]

_LOCK = 0x73686F616C  # "shoal": the advisory lock that lets one process migrate at a time

_V1 = """
CREATE TABLE leader (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    epoch BIGINT NOT NULL,
    holder TEXT NOT NULL,
    address TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
INSERT INTO leader VALUES (1, 0, '', '', '-infinity');
CREATE TABLE tasks (
    seq BIGINT PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    idempotency_key TEXT UNIQUE,
    tenant TEXT NOT NULL,
    priority INTEGER NOT NULL,
    spec BYTEA NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    state INTEGER,
    final_seq BIGINT,
    finished_at DOUBLE PRECISION,
    started_at DOUBLE PRECISION,
    node_id TEXT,
    attempt_epoch BIGINT,
    attempt_number BIGINT,
    result BYTEA,
    submitted_by TEXT NOT NULL DEFAULT '',
    finished_by TEXT,
    depends_on TEXT NOT NULL DEFAULT '[]',
    attempts BYTEA,
    placement TEXT
);
CREATE INDEX tasks_final_seq ON tasks (final_seq) WHERE final_seq IS NOT NULL;
CREATE INDEX tasks_unfinished ON tasks (seq) WHERE final_seq IS NULL;
CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    tenant TEXT NOT NULL,
    node_id TEXT NOT NULL,
    executors TEXT NOT NULL,
    labels TEXT NOT NULL,
    secret_hash BYTEA NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION,
    revoked_at DOUBLE PRECISION,
    created_by TEXT NOT NULL
);
CREATE TABLE schedules (name TEXT PRIMARY KEY, body BYTEA NOT NULL);
CREATE TABLE members (node_id TEXT PRIMARY KEY);
CREATE TABLE node_attempts (node_id TEXT PRIMARY KEY, attempts TEXT NOT NULL);
CREATE TABLE dispatched (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    node_id TEXT NOT NULL,
    attempts TEXT NOT NULL
);
CREATE TABLE requests (
    key TEXT PRIMARY KEY, first_seq BIGINT NOT NULL, count INTEGER NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX requests_by_time ON requests (created_at);
CREATE TABLE quotas (key TEXT PRIMARY KEY, body BYTEA NOT NULL);
CREATE TABLE lock_tokens (name TEXT PRIMARY KEY, token BIGINT NOT NULL);
CREATE TABLE leases (
    name TEXT NOT NULL, token BIGINT NOT NULL, body BYTEA NOT NULL, PRIMARY KEY (name, token)
);
CREATE TABLE usage (
    key TEXT NOT NULL, period TEXT NOT NULL, requests BIGINT NOT NULL, tokens BIGINT NOT NULL,
    cost DOUBLE PRECISION NOT NULL, PRIMARY KEY (key, period)
);
-- Every write transaction of a leader starts with this: it fails once another coordinator
-- took the lead, and its share lock makes a takeover wait for the transaction to end.
CREATE FUNCTION shoal_fence(e BIGINT) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM leader WHERE id = 1 AND epoch = e FOR SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'epoch % no longer leads', e USING ERRCODE = 'SH001';
    END IF;
END $$;
"""

_V2 = """
-- Every coordinator on the store, leading or standing by, says here that it lives.
CREATE TABLE coordinators (
    holder TEXT PRIMARY KEY, address TEXT NOT NULL, seen_at TIMESTAMPTZ NOT NULL
);
"""

_V3 = """
-- What List filters on and Get(include_dependents) reads: each task's executor, its labels and
-- metadata entries, and each dependency edge (an upstream id and its downstream task's seq).
ALTER TABLE tasks ADD COLUMN executor TEXT;
CREATE INDEX tasks_executor ON tasks (executor, seq);
CREATE TABLE task_labels (
    key TEXT NOT NULL, value TEXT NOT NULL, seq BIGINT NOT NULL, PRIMARY KEY (key, value, seq)
);
CREATE TABLE task_edges (upstream TEXT NOT NULL, seq BIGINT NOT NULL, PRIMARY KEY (upstream, seq));
INSERT INTO task_edges (upstream, seq)
    SELECT DISTINCT j.value, t.seq FROM tasks t, jsonb_array_elements_text(t.depends_on::jsonb) j
    WHERE t.depends_on <> '[]';
"""

MIGRATIONS: tuple[str, ...] = (_V1, _V2, _V3)
"""Migration N + 1 takes a store at version N to N + 1; never edit one that was released."""


def migrate(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    """Bring the schema up to date in one transaction: (version found, version now).

    FailedPrecondition-worthy states raise RuntimeError: a schema newer than this release.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        found = int(row[0]) if row and row[0] is not None else 0
        if found > len(MIGRATIONS):
            raise RuntimeError(
                f"the database's schema is version {found}, newer than this release knows"
                f" ({len(MIGRATIONS)}): run a newer shoal"
            )
        for version in range(found + 1, len(MIGRATIONS) + 1):
            conn.execute(MIGRATIONS[version - 1])
            conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
    return found, len(MIGRATIONS)
