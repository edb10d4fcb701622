"""`shoal store`: look at a coordinator's store, and go on from a damaged one."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from shoal._console import console, err_console, print_error
from shoal.config import STORE_FILE, CoordinatorSettings
from shoal.errors import ShoalError

if TYPE_CHECKING:
    from shoal.coordinator.store.marks import Marks
    from shoal.coordinator.store.storecheck import StoreReport

__all__ = ["app"]

app = typer.Typer(
    help="Check a coordinator's store; go on from one that lost data.", no_args_is_help=True
)

DataDirOpt = Annotated[
    Path | None, typer.Option(help="The coordinator's data dir [as `shoal coordinator`]")
]


def _store(data_dir: Path | None) -> Path:
    settings = CoordinatorSettings() if data_dir is None else CoordinatorSettings(data_dir=data_dir)
    return settings.data_dir / STORE_FILE


def _marks(marks: Marks | None) -> str:
    from shoal.coordinator.store.marks import seq_text

    if marks is None:
        return "none recorded"
    return (
        f"epoch {marks.epoch}, last accepted task {seq_text(marks.accepted)},"
        f" last outcome {seq_text(marks.finished)}"
    )


def _show(report: StoreReport) -> None:
    console.print(f"store       {escape(str(report.path))}", soft_wrap=True)
    console.print(f"must hold   {_marks(report.expected)}", soft_wrap=True)
    console.print(f"holds       {_marks(report.found)}", soft_wrap=True)
    if report.integrity:
        console.print(f"integrity   {escape('; '.join(report.integrity))}", soft_wrap=True)
        unfinished = report.tasks - report.finished
        console.print(f"tasks       {report.tasks} ({unfinished} unfinished)")
    for problem in report.problems:
        err_console.print(f"[red]lost:[/red] {escape(problem)}", soft_wrap=True)


@app.command()
def check(data_dir: DataDirOpt = None) -> None:
    """Check the store, changing nothing; exit status 1 when it lost data or is damaged.

    Runs SQLite's integrity_check, counts the tasks, and compares what the store holds with
    what its state file says it must hold.
    """
    from shoal.coordinator.store.storecheck import check_store

    report = check_store(_store(data_dir), thorough=True)
    _show(report)
    if report.problems:
        raise typer.Exit(1)
    console.print("ok")


@app.command("accept-loss")
def accept_loss(
    data_dir: DataDirOpt = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask")] = False,
) -> None:
    """Go on with what a damaged store holds; what it lost is lost for good.

    Restore the data dir from a backup instead, where there is one. This records what the
    store holds as what it must hold from now on, in an epoch past every one it used.
    """
    from shoal.coordinator.store import SqliteStore
    from shoal.coordinator.store.storecheck import check_store

    path = _store(data_dir)
    report = check_store(path)
    _show(report)
    if not report.problems:
        console.print("it lost nothing: nothing to accept")
        return
    if not yes:
        typer.confirm("Go on with what it holds, and lose the rest for good?", abort=True)

    async def accept() -> int:
        store = SqliteStore(path, accept_loss=True)
        epoch = await store.open()
        await store.close()
        return epoch

    try:
        epoch = asyncio.run(accept())
    except ShoalError as err:
        print_error(err)
        raise typer.Exit(1) from None
    console.print(f"accepted: a coordinator goes on with what it holds, in an epoch past {epoch}")


StoreOpt = Annotated[str, typer.Option("--store", help="postgresql://user@host/db")]


def _database(store: str) -> None:
    from shoal.coordinator.store.postgres import is_postgres_url

    if not is_postgres_url(store):
        print_error(ShoalError("--store takes a postgresql:// URL (SQLite migrates at start)"))
        raise typer.Exit(2)


@app.command()
def migrate(store: StoreOpt) -> None:
    """Bring a PostgreSQL store's schema up to date (coordinators also do it at start)."""
    from shoal.coordinator.store.postgres import PostgresStore

    _database(store)

    async def run() -> tuple[int, int]:
        pg = PostgresStore(store)
        try:
            return await pg.migrate()
        finally:
            await pg.close()

    try:
        found, now = asyncio.run(run())
    except ShoalError as err:
        print_error(err)
        raise typer.Exit(1) from None
    console.print(f"schema version {now}" + ("" if found == now else f" (was {found})"))


@app.command()
def status(store: StoreOpt) -> None:
    """Which coordinator leads on a PostgreSQL store, and which stand by."""
    import psycopg

    from shoal.coordinator.store.leadership import members
    from shoal.coordinator.store.pgwriter import connect
    from shoal.coordinator.store.postgres import redacted

    _database(store)
    try:
        with connect(store) as conn:
            leader, seen = members(conn)
    except psycopg.Error as err:
        print_error(ShoalError(f"cannot read {redacted(store)}: {err}"))
        raise typer.Exit(1) from None
    if leader is None:
        console.print("leader      none yet")
    else:
        state = "" if leader.live else " [red](its lease ran out)[/red]"
        console.print(f"leader      {escape(leader.address)} epoch {leader.epoch}{state}")
    for member in seen:
        if not member.leads:
            console.print(
                f"standby     {escape(member.address)} (seen {member.seen_ago:.1f} s ago)"
            )


@app.command()
def copy(
    to: Annotated[str, typer.Option("--to", help="postgresql://user@host/db (empty)")],
    source: Annotated[
        Path | None,
        typer.Option("--from", help="The data dir of the SQLite store [as `shoal coordinator`]"),
    ] = None,
) -> None:
    """Move an SQLite store into an empty PostgreSQL database (stop its coordinator first)."""
    from shoal.coordinator.store.copy import copy_store

    _database(to)
    try:
        counts = copy_store(_store(source), to)
    except ShoalError as err:
        print_error(err)
        raise typer.Exit(1) from None
    copied = ", ".join(f"{n} {table}" for table, n in counts.items() if n)
    console.print(f"copied {copied or 'nothing'}")
