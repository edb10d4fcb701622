"""The figures tests publish, printed again at the end of the session (see tests/conftest.py)."""

from __future__ import annotations

__all__ = ["publish", "take_published"]

_LINES: list[str] = []


def publish(line: str) -> None:
    """Print a test's figures now (shown with a failure) and again in the session summary."""
    print(line)
    _LINES.append(line)


def take_published() -> list[str]:
    """The lines published since the last call (the session's conftest hands them on)."""
    taken = list(_LINES)
    _LINES.clear()
    return taken
