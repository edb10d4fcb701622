"""The root `shoal` command, and what its commands share: the coordinator option, the client,
and Shoal errors as a message and exit status 1."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import timedelta
from typing import Annotated, TypeVar

import typer

from shoal import __version__
from shoal._client import AsyncClient
from shoal._console import console, err_console, print_error
from shoal.errors import ShoalError

# Help texts are plain text: rich markup would eat their "[default]" and "[env ...]" notes.
app = typer.Typer(
    help="Shoal: spread background work across machines.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
_T = TypeVar("_T")

CoordinatorOpt = Annotated[
    str | None,
    typer.Option("--coordinator", "-c", help="Coordinator address [env SHOAL_COORDINATOR]"),
]


def _print_version(value: bool) -> None:
    if value:
        console.print(f"shoal {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit"
        ),
    ] = False,
) -> None:
    """Shoal: spread background work across machines."""


def connect(coordinator: str | None) -> AsyncClient:
    # Someone waits at the terminal: ride out a restart, not a coordinator that is gone.
    return AsyncClient(coordinator, retry_for=timedelta(seconds=5))


def run_async(coro: Awaitable[_T]) -> _T:
    """Run a coroutine; Shoal errors become a message and exit status 1, and a serving command
    stopped at once by a second SIGINT or SIGTERM (it cancels the coroutine) exits with 130."""
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except asyncio.CancelledError:
        err_console.print("stopped at once")
        raise typer.Exit(130) from None
    except ShoalError as err:
        print_error(err)
        raise typer.Exit(1) from None


def parse_labels(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def duration(seconds: float | None) -> timedelta | None:
    return None if seconds is None else timedelta(seconds=seconds)


JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON list instead of a table")]
