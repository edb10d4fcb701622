"""The CLI's commands whose dependencies come with an extra (`pip install 'shoal[node]'`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.markup import escape

from shoal._console import err_console

__all__ = ["needs_extra"]


@contextlib.contextmanager
def needs_extra(*extras: str) -> Iterator[None]:
    """Imports in this block that fail for want of a third-party module end the command with
    one line naming the extras to install (exit 1); Shoal's own missing modules still raise."""
    try:
        yield
    except ModuleNotFoundError as err:
        if not err.name or err.name.partition(".")[0] == "shoal":
            raise
        wanted = ",".join(extras)
        message = (
            f"this command needs shoal[{wanted}] ({err.name} is not installed):"
            f" pip install 'shoal[{wanted}]'"
        )
        err_console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None
