"""The CLI's consoles and how it reports an error."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

from shoal.errors import ShoalError

__all__ = ["console", "err_console", "print_error"]

console = Console()
err_console = Console(stderr=True)


def print_error(err: ShoalError) -> None:
    """`error: message`, then one line per bad field, on stderr."""
    err_console.print(f"[red]error:[/red] {escape(err.message)}", soft_wrap=True)
    for v in getattr(err, "violations", []):
        err_console.print(f"  {escape(v.field)}: {escape(v.description)}")
