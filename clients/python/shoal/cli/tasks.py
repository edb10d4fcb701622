"""Task commands: `run`, `submit`, `get`, `wait`, `cancel`, `ls` and `watch`."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from google.protobuf import json_format
from rich.table import Table
from rich.text import Text

from shoal._client import AsyncClient
from shoal._console import console, err_console
from shoal._output import chunk_bytes
from shoal.cli.app import CoordinatorOpt, app, connect, run_async
from shoal.cli.render import (
    ProgressBar,
    exit_text,
    plain,
    progress_text,
    returned_text,
    shown,
    state_text,
    visible,
)
from shoal.cli.specs import (
    AfterOpt,
    AtOpt,
    DockerOpt,
    FunctionOpt,
    HttpOpt,
    InputOpt,
    KeyOpt,
    LabelOpt,
    MethodOpt,
    NameOpt,
    PriorityOpt,
    PythonOpt,
    QueueTimeoutOpt,
    RetriesOpt,
    TenantOpt,
    TimeoutOpt,
    ToolOpt,
    build_spec,
    read_specs,
)
from shoal.errors import ShoalError, WaitTimeout
from shoal.specs import is_final, state_name
from shoal.v1 import task_pb2


@app.command(context_settings={"allow_interspersed_args": False})
def run(
    command: Annotated[list[str] | None, typer.Argument(help="Command and arguments")] = None,
    coordinator: CoordinatorOpt = None,
    python_code: PythonOpt = None,
    name: NameOpt = "",
    priority: PriorityOpt = "normal",
    timeout: TimeoutOpt = None,
    label: LabelOpt = None,
    key: KeyOpt = "",
    tenant: TenantOpt = "",
    after: AfterOpt = None,
    retries: RetriesOpt = 0,
    queue_timeout: QueueTimeoutOpt = None,
    at: AtOpt = None,
    docker: DockerOpt = None,
    http: HttpOpt = None,
    method: MethodOpt = "GET",
    tool: ToolOpt = None,
    tool_input: InputOpt = None,
    function: FunctionOpt = None,
) -> None:
    """Run a task, stream its output live, and exit with its exit code."""
    spec = build_spec(
        command or [],
        python_code,
        name=name,
        priority=priority,
        timeout=timeout,
        label=label,
        key=key,
        tenant=tenant,
        after=after,
        retries=retries,
        queue_timeout=queue_timeout,
        at=at,
        docker=docker,
        http=http,
        method=method,
        tool=tool,
        tool_input=tool_input,
        function=function,
    )
    code = run_async(_follow(coordinator, spec))
    raise typer.Exit(code)


def _teller() -> Callable[[task_pb2.Task], None]:
    """Prints why a task waits, on stderr; a reason said just before is not said again."""
    said = ""

    def tell(task: task_pb2.Task) -> None:
        nonlocal said
        if task.pending_reason != said:
            said = task.pending_reason
            err_console.print(f"[yellow]waiting[/yellow]: {shown(said)}", highlight=False)

    return tell


async def _telling(client: AsyncClient, task_ids: list[str]) -> None:
    """Say why the first of `task_ids` not final yet waits, while it does (until cancelled)."""
    tell = _teller()
    for task_id in task_ids:
        await client.wait_with_reasons(task_id, tell)


async def _follow(coordinator: str | None, spec: task_pb2.TaskSpec) -> int:
    async with connect(coordinator) as client:
        task = await client.submit(spec)
        err_console.print(f"[dim]task {task.id}[/dim]")
        teller = asyncio.create_task(_telling(client, [task.id]))
        bar = ProgressBar()
        try:
            async for event in client.watch(
                since=task.created_seq - 1, task_ids=[task.id], output=True
            ):
                if event.HasField("progress"):
                    bar.show(event.progress)
                elif event.HasField("output"):
                    out = (
                        sys.stderr
                        if event.output.stream == task_pb2.OUTPUT_STREAM_STDERR
                        else sys.stdout
                    )
                    # The task's bytes as it wrote them, whatever their encoding.
                    out.buffer.write(chunk_bytes(event.output))
                    out.flush()
                elif is_final(event.state):
                    bar.close()
                    result = event.result
                    if spec.HasField("tool") and result.HasField("output"):
                        # A tool streams nothing: what it returned is its output.
                        console.print_json(data=json_format.MessageToDict(result.output))
                    elif spec.HasField("function") and "value" in result.output.fields:
                        # What the function returned, as JSON (after what it printed).
                        sys.stdout.write(result.output.fields["value"].string_value + "\n")
                    if result.error and event.state != task_pb2.TASK_STATE_SUCCEEDED:
                        err_console.print(
                            f"[red]{state_name(event.state)}[/red]: {shown(result.error)}"
                        )
                    return _process_exit(event.state, result)
        except asyncio.CancelledError:
            with contextlib.suppress(ShoalError):
                await client.cancel(task.id)
            raise
        finally:
            bar.close()
            await _stopped(teller)
    return 1


async def _stopped(teller: asyncio.Task[None]) -> None:
    """Stop a `_telling` task; what it met is not the command's outcome."""
    teller.cancel()
    with contextlib.suppress(asyncio.CancelledError, ShoalError):
        await teller


@app.command()
def submit(
    command: Annotated[list[str] | None, typer.Argument(help="Command and arguments")] = None,
    coordinator: CoordinatorOpt = None,
    python_code: PythonOpt = None,
    name: NameOpt = "",
    priority: PriorityOpt = "normal",
    timeout: TimeoutOpt = None,
    label: LabelOpt = None,
    key: KeyOpt = "",
    tenant: TenantOpt = "",
    after: AfterOpt = None,
    retries: RetriesOpt = 0,
    queue_timeout: QueueTimeoutOpt = None,
    at: AtOpt = None,
    docker: DockerOpt = None,
    http: HttpOpt = None,
    method: MethodOpt = "GET",
    tool: ToolOpt = None,
    tool_input: InputOpt = None,
    function: FunctionOpt = None,
    count: Annotated[int, typer.Option(help="Submit this many copies, in batches", min=1)] = 1,
    file: Annotated[
        Path | None,
        typer.Option(help="JSON file: a TaskSpec object, or a list of them (proto JSON)"),
    ] = None,
    wait: Annotated[
        bool, typer.Option(help="Wait for every task to finish; exit 1 unless all succeeded")
    ] = False,
) -> None:
    """Submit tasks and print their ids (a progress bar for batches)."""
    if file is not None:
        specs = read_specs(file)
    else:
        one = build_spec(
            command or [],
            python_code,
            name=name,
            priority=priority,
            timeout=timeout,
            label=label,
            key=key,
            tenant=tenant,
            after=after,
            retries=retries,
            queue_timeout=queue_timeout,
            at=at,
            docker=docker,
            http=http,
            method=method,
            tool=tool,
            tool_input=tool_input,
            function=function,
        )
        specs = [one] * count
    if not run_async(_submit(coordinator, specs, wait)):
        raise typer.Exit(1)


async def _submit(coordinator: str | None, specs: list[task_pb2.TaskSpec], wait: bool) -> bool:
    """Submit `specs`, print their ids (or, with `wait`, their outcomes); whether all is well:
    with `wait`, every task succeeded."""
    async with connect(coordinator) as client:
        if len(specs) == 1 and not wait:
            task = await client.submit(specs[0])
            console.print(task.id)
            return True
        ids: list[str] = []
        from rich.progress import Progress  # loads in a few hundredths of a second

        with Progress(console=err_console, transient=True) as progress:
            bar = progress.add_task("submitting", total=len(specs))
            for i in range(0, len(specs), 1000):
                ids += await client.submit_batch(specs[i : i + 1000])
                progress.update(bar, completed=len(ids))
            if wait:
                if len(ids) == 1:
                    err_console.print(f"[dim]task {ids[0]}[/dim]")
                done = progress.add_task("running", total=len(ids))
                tasks = []
                teller = asyncio.create_task(_telling(client, ids))
                moving = asyncio.create_task(_progress_of(client, ids, progress, done))
                try:
                    for coro in asyncio.as_completed([client.wait(i) for i in ids]):
                        tasks.append(await coro)
                        progress.update(done, completed=len(tasks))
                except asyncio.CancelledError:  # Ctrl-C: the tasks go on
                    progress.stop()
                    _going_on(ids, tasks)
                    raise
                finally:
                    await _stopped(moving)
                    await _stopped(teller)
        if wait and len(tasks) == 1:
            _say_ended(tasks[0])
            return tasks[0].state == task_pb2.TASK_STATE_SUCCEEDED
        if wait:
            counts: dict[str, int] = {}
            for t in tasks:
                counts[state_name(t.state)] = counts.get(state_name(t.state), 0) + 1
                if t.state != task_pb2.TASK_STATE_SUCCEEDED:
                    console.print(f"{t.id} {state_text(t.state)}", highlight=False)
            console.print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
            return set(counts) == {"SUCCEEDED"}
        for task_id in ids:
            console.print(task_id)
        return True


def _going_on(ids: list[str], ended: list[task_pb2.Task]) -> None:
    """Waiting stopped (Ctrl-C): the ids of the tasks that go on, on stdout, and a note."""
    done = {t.id for t in ended}
    going = [i for i in ids if i not in done]
    for task_id in going:
        console.print(task_id)
    err_console.print(
        f"stopped waiting; {len(going)} task(s) go on (`shoal cancel ID` stops one)",
        highlight=False,
    )


async def _progress_of(client: AsyncClient, ids: list[str], bar: Any, row: Any) -> None:
    """Move `row` of `bar` as a single task reports its progress (until cancelled)."""
    if len(ids) != 1:
        return
    task = await client.get(ids[0])
    async for event in client.watch(since=task.created_seq - 1, task_ids=ids):
        if event.HasField("progress"):
            message = shown(event.progress.message[:60])
            bar.update(row, completed=event.progress.fraction, description=message)


@app.command()
def get(
    task_id: str,
    coordinator: CoordinatorOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the task as JSON")] = False,
) -> None:
    """Show one task."""

    async def main() -> task_pb2.Task:
        async with connect(coordinator) as client:
            return await client.get(task_id)

    task = run_async(main())
    if as_json:
        console.print_json(json_format.MessageToJson(task))
        return
    table = Table(show_header=False, box=None)
    rows: list[tuple[str, str | Text]] = [
        ("id", task.id),
        ("name", task.spec.name),
        ("kind", task.spec.WhichOneof("kind") or ""),
        ("state", Text.from_markup(state_text(task.state))),
        ("node", task.node_id),
        ("attempt", f"{task.attempt.number}" if task.attempt.number else ""),
        ("after", ", ".join(task.depends_on)),
        ("retried", f"{len(task.attempts)} earlier attempt(s)" if task.attempts else ""),
        ("waiting", task.pending_reason),
        (
            "progress",
            progress_text(task.progress)
            if task.HasField("progress") and not is_final(task.state)
            else "",
        ),
        ("exit code", exit_text(task)),
        ("returned", _returned(task)),
        ("error", task.result.error),
    ]
    for k, v in rows:
        if v:
            table.add_row(Text(k, style="bold"), v if isinstance(v, Text) else plain(v)[0])
    console.print(table)
    if task.result.stdout:
        console.print("[bold]stdout[/bold]", markup=True)
        console.out(_output(task.result.stdout), end="")
    if task.result.stderr:
        console.print("[bold]stderr[/bold]", markup=True)
        console.out(_output(task.result.stderr), end="")


def _output(text: str) -> str:
    """A task's output as `get` shows it: in a terminal, with its escape sequences shown."""
    return visible(text, output=True) if console.is_terminal else text


def _returned(task: task_pb2.Task) -> str:
    """What a function or tool task returned, as JSON (its first _RETURNED characters)."""
    if task.spec.WhichOneof("kind") not in ("function", "tool"):
        return ""
    text = returned_text(task)
    return text if len(text) <= _RETURNED else text[:_RETURNED] + " ... (`--json` has it all)"


_RETURNED = 2000


@app.command("wait")
def wait_for(task_id: str, coordinator: CoordinatorOpt = None) -> None:
    """Wait for a task to end, saying why it waits; exit with its exit code (as run does)."""

    async def main() -> task_pb2.Task:
        async with connect(coordinator) as client:
            return await client.wait_with_reasons(task_id, _teller())

    task = run_async(main())
    _say_ended(task)
    raise typer.Exit(_process_exit(task.state, task.result))


def _say_ended(task: task_pb2.Task) -> None:
    """How a task ended: its id and state, what it returned (a function or tool), its error."""
    console.print(f"{task.id} {state_text(task.state)}", highlight=False)
    if returned := _returned(task):
        console.out(returned)
    if task.result.error:
        err_console.print(f"[red]{state_name(task.state)}[/red]: {shown(task.result.error)}")


def _process_exit(state: int, result: task_pb2.TaskResult) -> int:
    """0 for success, the task's own exit code when it failed with one, 124 for a timeout."""
    if state == task_pb2.TASK_STATE_SUCCEEDED:
        return 0
    if state == task_pb2.TASK_STATE_FAILED and result.exit_code > 0:
        return result.exit_code
    return 124 if state == task_pb2.TASK_STATE_TIMED_OUT else 1


@app.command()
def cancel(task_id: str, coordinator: CoordinatorOpt = None) -> None:
    """Cancel a task (a running one is killed on its node, which this waits for a while)."""

    async def main() -> task_pb2.Task:
        async with connect(coordinator) as client:
            task = await client.cancel(task_id)
            if is_final(task.state):
                return task
            try:  # its node stops it
                return await client.wait(task_id, timeout=_STOPPING)
            except WaitTimeout as err:
                return err.task

    task = run_async(main())
    if task.state != task_pb2.TASK_STATE_CANCELLED and is_final(task.state):
        console.print(f"{task.id} {state_text(task.state)} (it had ended: nothing to cancel)")
    elif not is_final(task.state):
        console.print(f"{task.id} {state_text(task.state)} (its node is stopping it)")
    else:
        console.print(f"{task.id} {state_text(task.state)}")


_STOPPING = timedelta(seconds=10)  # how long `cancel` waits for a running task to stop
