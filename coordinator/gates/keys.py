"""The keys gates hold tasks under and circuit breakers guard, written in one place.

`quota:<key>` and `lock:<name>` name what a held task waits on; a breaker guards
`node:<id>` (a node), `node:<id>/<executor>` (one executor of a node) or `backend:<name>`.
"""

from __future__ import annotations

__all__ = ["backend_key", "executor_key", "lock_key", "node_key", "quota_key", "quota_of"]


def quota_key(key: str) -> str:
    return f"quota:{key}"


def quota_of(key: str) -> str | None:
    """The quota key a held task's key names; None when it names no quota."""
    return key.removeprefix("quota:") if key.startswith("quota:") else None


def lock_key(name: str) -> str:
    return f"lock:{name}"


def node_key(node_id: str) -> str:
    return f"node:{node_id}"


def executor_key(node_id: str, executor: str) -> str:
    return f"node:{node_id}/{executor}"


def backend_key(backend: str) -> str:
    return f"backend:{backend}"
