"""`shoal ls` and `shoal watch`: the tasks there are, and what happens to them."""

from __future__ import annotations

import contextlib
from typing import Annotated

import typer
from rich.table import Table

from shoal._console import console
from shoal.cli.app import CoordinatorOpt, JsonOpt, app, connect, run_async
from shoal.cli.render import event_line, exit_text, plain, print_json, state_text
from shoal.cli.specs import TenantOpt
from shoal.v1 import task_pb2


@app.command("ls")
def ls(
    coordinator: CoordinatorOpt = None,
    state: Annotated[list[str] | None, typer.Option(help="Only these states")] = None,
    tenant: TenantOpt = "",
    limit: Annotated[int, typer.Option(help="At most this many")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """List tasks, newest first."""
    try:
        states = [task_pb2.TaskState.Value(f"TASK_STATE_{s.upper()}") for s in state or []]
    except ValueError:
        known = [n.removeprefix("TASK_STATE_").lower() for n in task_pb2.TaskState.keys()[1:]]
        raise typer.BadParameter(f"states are {', '.join(known)}", param_hint="--state") from None

    async def main() -> list[task_pb2.Task]:
        async with connect(coordinator) as client:
            return await client.list(states=states, tenant=tenant, limit=limit)

    tasks = run_async(main())
    if as_json:
        print_json(tasks)
        return
    table = Table()
    table.add_column("id", no_wrap=True, min_width=16)  # whole: `shoal get` takes no less
    for col in ("name", "kind", "state", "exit", "node", "created"):
        table.add_column(col)
    for t in tasks:
        table.add_row(
            *plain(t.id, t.spec.name, t.spec.WhichOneof("kind") or ""),
            state_text(t.state),
            *plain(exit_text(t), t.node_id),
            t.created_at.ToDatetime().strftime("%H:%M:%S"),
        )
    console.print(table)


@app.command()
def watch(
    coordinator: CoordinatorOpt = None,
    since: Annotated[
        int | None, typer.Option(help="Replay events after this sequence number")
    ] = None,
    task: Annotated[list[str] | None, typer.Option(help="Only these task ids")] = None,
    output: Annotated[bool, typer.Option(help="Include output chunks")] = False,
) -> None:
    """Follow the event stream (Ctrl-C to stop)."""

    async def main() -> None:
        async with connect(coordinator) as client:
            async for e in client.watch(since=since, task_ids=task or [], output=output):
                console.print(f"{e.seq} {event_line(e)}", highlight=False)

    with contextlib.suppress(KeyboardInterrupt):
        run_async(main())
