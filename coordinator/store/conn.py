"""What the shared statements need of a connection: SQLite's own, or PostgreSQL's adapted
(postgres.PgConn)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

__all__ = ["Conn", "Cursor", "Op"]


class Cursor(Protocol):
    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Conn(Protocol):
    """The part of sqlite3.Connection the statements use."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Any: ...


Op = Callable[[Conn], Any]
"""One operation of a group commit: its statements, run by the writer in the transaction."""
