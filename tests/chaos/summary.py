"""The figures chaos scenarios print, kept for the end of the session (see conftest.py)."""

from __future__ import annotations

__all__ = ["publish", "published"]

_LINES: list[str] = []


def publish(line: str) -> None:
    """Print a scenario's figures now (shown with a failure) and again in the session summary."""
    print(line)
    _LINES.append(line)


def published() -> list[str]:
    return list(_LINES)
