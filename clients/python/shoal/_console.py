"""The CLI's consoles and how it reports an error."""

from __future__ import annotations

import functools
import traceback
from collections.abc import Callable
from typing import ParamSpec

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from shoal.errors import ShoalError

__all__ = ["console", "err_console", "print_error", "serving"]

_P = ParamSpec("_P")

console = Console()
err_console = Console(stderr=True)


def print_error(err: ShoalError) -> None:
    """`error: message`, then one line per bad field, on stderr."""
    err_console.print(f"[red]error:[/red] {escape(err.message)}", soft_wrap=True)
    for v in getattr(err, "violations", []):
        line = f"{v.field}: {v.description}"
        if line not in err.message:  # (a message of one violation says it already)
            err_console.print(f"  {escape(line)}")


def serving(command: Callable[_P, None]) -> Callable[_P, None]:
    """For a command that runs a server: a mistake that stops it (a port in use, an unreadable
    file, a bad setting) ends the process with one line on stderr and status 1, after its
    traceback with --verbose."""

    @functools.wraps(command)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> None:
        try:
            command(*args, **kwargs)
        except (ShoalError, OSError, ValidationError) as err:
            if kwargs.get("verbose"):
                traceback.print_exc()
            err_console.print(f"[red]error:[/red] {escape(_mistake(err))}", soft_wrap=True)
            raise typer.Exit(1) from None

    return run


def _mistake(err: ShoalError | OSError | ValidationError) -> str:
    if isinstance(err, ShoalError):
        return err.message
    if isinstance(err, ValidationError):
        return "bad setting: " + "; ".join(
            _bad_field(e["loc"], e["msg"], e["input"]) for e in err.errors()
        )
    if err.filename is not None:
        return f"cannot use {err.filename}: {err.strerror}"
    return str(err)


def _bad_field(loc: tuple[int | str, ...], msg: str, given: object) -> str:
    name = ".".join(str(p) for p in loc)
    if any(word in name for word in ("key", "token", "secret")):
        return f"{name}: {msg}"  # what was given may be a secret
    return f"{name}: {msg} (got {repr(given)[:80]})"
