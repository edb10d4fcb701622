"""The functions `shoal up --demo` has its local node run (`--import shoal.demo_tasks`)."""

from __future__ import annotations

from shoal._function import task


@task
def area(width: int, height: int) -> int:
    """A function call among the demo's tasks."""
    return width * height
