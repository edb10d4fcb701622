"""`shoal logs`, `shoal artifacts` (what a task wrote and made) and `shoal progress` (said
from inside a task)."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from shoal._console import console, err_console
from shoal._output import chunk_bytes, stderr_bytes, stdout_bytes
from shoal._progress import PROGRESS_FD, format_line
from shoal.cli.app import CoordinatorOpt, app, connect, run_async
from shoal.cli.render import plain, visible
from shoal.specs import is_final, state_name
from shoal.v1 import task_pb2


def _write(stream: int, data: bytes) -> None:
    """A task's output as it is; in a terminal, with its escape sequences shown but colours."""
    out = sys.stderr if stream == task_pb2.OUTPUT_STREAM_STDERR else sys.stdout
    if out.isatty():
        data = visible(data.decode(errors="replace"), output=True).encode()
    out.buffer.write(data)
    out.flush()


@app.command()
def logs(
    task_id: str,
    coordinator: CoordinatorOpt = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Follow its output live until it ends")
    ] = False,
) -> None:
    """Print a task's output: as kept in its result once it has ended, or live with -f."""

    async def main() -> None:
        async with connect(coordinator) as client:
            task = await client.get(task_id)
            if not follow and not is_final(task.state):
                err_console.print(
                    f"task {escape(task_id)} is {state_name(task.state)}: its output is kept once"
                    f" it has ended; `shoal logs -f {escape(task_id)}` prints it from its start,"
                    " live",
                    highlight=False,
                )
            if not follow or is_final(task.state):
                task = await client.wait(task_id) if follow else task
                _write(task_pb2.OUTPUT_STREAM_STDOUT, stdout_bytes(task.result))
                _write(task_pb2.OUTPUT_STREAM_STDERR, stderr_bytes(task.result))
                return
            async for event in client.watch(
                since=task.created_seq - 1, task_ids=[task_id], output=True
            ):
                if event.HasField("output"):
                    if event.output.stream != task_pb2.OUTPUT_STREAM_PROGRESS:
                        _write(event.output.stream, chunk_bytes(event.output))
                elif is_final(event.state):
                    return

    run_async(main())


@app.command()
def artifacts(
    task_id: str,
    name: Annotated[str | None, typer.Argument(help="The artifact to save")] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Where to save it ('-': stdout)")
    ] = None,
    coordinator: CoordinatorOpt = None,
) -> None:
    """List a task's artifacts, or save one (NAME) to a file."""

    async def main() -> task_pb2.Task:
        async with connect(coordinator) as client:
            return await client.get(task_id)

    task = run_async(main())
    found = {a.name: a for a in task.result.artifacts}
    if name is None:
        table = Table("name", "bytes", "type", box=None)
        for a in task.result.artifacts:
            table.add_row(*plain(a.name, str(len(a.data)), a.media_type))
        console.print(table)
        return
    artifact = found.get(name)
    if artifact is None:
        have = escape(", ".join(sorted(found)) or "none")
        missing = escape(f"task {task_id} has no artifact {name!r}")
        err_console.print(f"[red]{missing}[/red] (it has: {have})")
        raise typer.Exit(1)
    if output is None or str(output) == "-":
        sys.stdout.buffer.write(artifact.data)
        sys.stdout.flush()
        return
    try:
        output.write_bytes(artifact.data)
    except OSError as err:
        why = escape(f"cannot save to {output}: {err.strerror or err}")
        err_console.print(f"[red]{why}[/red]")
        raise typer.Exit(1) from None
    err_console.print(f"saved {escape(name)} ({len(artifact.data)} bytes) to {escape(str(output))}")


@app.command()
def progress(
    fraction: Annotated[float, typer.Argument(help="How far the task is, from 0 to 1")],
    message: Annotated[str, typer.Argument(help="What it is doing")] = "",
) -> None:
    """Report the progress of the task this runs in (a shell or python task)."""
    if not math.isfinite(fraction):
        err_console.print(f"a fraction from 0 to 1, not {fraction}")
        raise typer.Exit(2)
    fd = os.environ.get(PROGRESS_FD, "")
    if not fd.isdigit():
        err_console.print(f"not inside a Shoal task: {PROGRESS_FD} is not set")
        raise typer.Exit(2)
    try:
        os.write(int(fd), format_line(min(1.0, max(0.0, fraction)), message))
    except OSError as err:
        err_console.print(f"cannot report progress: {err.strerror or err}")
        raise typer.Exit(1) from None
