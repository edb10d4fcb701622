"""`shoal up`: a coordinator and one local node in one process, and its optional demo batch."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import shlex
import shutil
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from shoal import _builders, demo_tasks
from shoal._client import AsyncClient
from shoal._console import console, err_console, serving
from shoal._extras import needs_extra
from shoal._server import collect_seldom, raise_open_files_limit
from shoal._signals import until_signalled
from shoal.cli.app import app, run_async
from shoal.cli.options import AuthOpt, HttpListenOpt, VerboseOpt, given, setup_logging
from shoal.cli.render import plain, returned_text, state_text
from shoal.config import ADMIN_TOKEN_FILE, CoordinatorSettings, NodeSettings, default_data_dir

if TYPE_CHECKING:
    from shoal.coordinator.server import CoordinatorServer
    from shoal.node.agent import NodeAgent
    from shoal.node.guard import ResourceGuard

_DASHBOARD_PORT = 7080
_DEMO_TASKS = "shoal.demo_tasks"  # the demo's function, run on the local node


def _free_port(host: str, first: int, tries: int = 20) -> int:
    """The first of `tries` ports from `first` that `host` can bind now (`first` if none)."""
    for port in range(first, first + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    return first


@app.command()
@serving
def up(
    listen: Annotated[str | None, typer.Option(help="Coordinator address to bind")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Where the embedded store lives")] = None,
    slots: Annotated[int | None, typer.Option(help="Concurrent tasks on the local node")] = None,
    import_: Annotated[
        list[str] | None,
        typer.Option(
            "--import", help="A module whose @shoal.task functions the local node runs (repeatable)"
        ),
    ] = None,
    auth: AuthOpt = None,
    http_listen: HttpListenOpt = None,
    demo: Annotated[bool, typer.Option(help="Run a short demo batch once started")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Start a coordinator and one local node in this process (loopback, embedded SQLite)."""
    with needs_extra("coordinator", "node"):
        from shoal.coordinator.server import CoordinatorServer
        from shoal.node.agent import NodeAgent

    setup_logging(verbose)
    raise_open_files_limit()
    coord_settings = CoordinatorSettings(
        **given(listen=listen, data_dir=data_dir, auth=auth, http_listen=http_listen)
    )
    if "http_listen" not in coord_settings.model_fields_set:
        # The dashboard is on by default here, on loopback: 7080, or the next free port.
        port = _free_port("127.0.0.1", _DASHBOARD_PORT)
        coord_settings = coord_settings.model_copy(update={"http_listen": f"127.0.0.1:{port}"})
    coord = CoordinatorServer(coord_settings)

    async def main() -> None:
        async with coord:
            token_file = coord.admin_token_path if coord.settings.auth else None
            settings = NodeSettings(
                **given(
                    coordinator=coord.address,
                    slots=slots,
                    token_file=token_file,
                    imports=[*(import_ or []), *([_DEMO_TASKS] if demo else [])] or None,
                )
            )
            if "guard_min_priority" not in settings.model_fields_set:
                # The local node runs what its own user asks for: a busy laptop holds back
                # only work below the default priority.
                settings = settings.model_copy(update={"guard_min_priority": "normal"})
            node = NodeAgent(settings)
            node.on_guard_change = functools.partial(_guard_changed, settings)
            async with node:
                _print_up(coord, token_file, node, settings)
                if demo:
                    await asyncio.wait_for(node.connected.wait(), 10)
                    await _demo(coord.address, token_file)
                collect_seldom()
                await until_signalled()

    run_async(main())


def _print_up(
    coord: CoordinatorServer, token_file: Path | None, node: NodeAgent, settings: NodeSettings
) -> None:
    address = coord.address
    console.print(f"[bold]Shoal is up[/bold]: gRPC [cyan]{address}[/cyan]")
    if coord.http_url:
        console.print(f"  dashboard: [cyan]{coord.http_url}[/cyan]")
    console.print(f"  data dir    {coord.settings.data_dir}")
    # The CLI finds the admin token of the default data dir by itself; another it is told of.
    told = ""
    if token_file is not None:
        found = token_file.resolve() == (default_data_dir() / ADMIN_TOKEN_FILE).resolve()
        told = "" if found else f"SHOAL_TOKEN_FILE={shlex.quote(str(token_file))} "
        how = "the CLI finds it by itself" if found else "set SHOAL_TOKEN_FILE to it"
        console.print(f"  admin token {token_file} (mode 0600; {how})")
    console.print(f"  local node  {node.node_id} (health on 127.0.0.1:{node.port})")
    if settings.imports:
        functions = ", ".join(node.info().functions) or "none (see the log above)"
        console.print(f"  functions   {functions}", highlight=False, soft_wrap=True)
    console.print(f"  guard       {_guard_summary(settings)}", highlight=False)
    console.print(
        f"  try: {told}{_shoal_command()} run -c {address} -- echo hello;  Ctrl-C to stop",
        highlight=False,
        soft_wrap=True,  # one line to copy, however long
    )


def _guard_summary(settings: NodeSettings) -> str:
    """What the local node's resource guard does, in one line."""
    if not settings.guard:
        return "off: the local node takes every priority, however busy the machine"
    floor = settings.guard_min_priority.upper()
    pause = "; pauses BACKGROUND tasks" if settings.guard_policy == "pause" else ""
    return (
        f"on: while other programs use over {settings.guard_cpu_percent:g}% CPU or"
        f" {settings.guard_memory_percent:g}% memory, the local node takes only {floor}"
        f" priority or higher{pause} (SHOAL_NODE_GUARD=false turns it off)"
    )


def _guard_changed(settings: NodeSettings, guard: ResourceGuard) -> None:
    """Say loudly that the local node is throttled, and when it is not any more."""
    if guard.busy:
        floor = settings.guard_min_priority.upper()
        err_console.print(
            f"[bold yellow]local node throttled[/bold yellow]: the machine is busy"
            f" ({guard.reason}); only {floor} priority or higher runs until it is calm",
            highlight=False,
        )
    else:
        err_console.print("[green]local node calm again[/green]: every priority runs")


def _shoal_command() -> str:
    """How the user can type this very `shoal`: its name when the shell finds it on PATH,
    else its path (relative when under the current directory, e.g. `.venv/bin/shoal`)."""
    me = Path(sys.argv[0]).absolute()
    found = shutil.which("shoal")
    if found is not None and Path(found).absolute() == me:
        return "shoal"
    with contextlib.suppress(ValueError):
        return shlex.quote(str(me.relative_to(Path.cwd())))
    return shlex.quote(str(me))


async def _demo(address: str, token_file: Path | None) -> None:
    specs = [
        _builders.shell(["uname", "-sr"], name="kernel"),
        _builders.shell("echo $((6 * 7))", name="arithmetic"),
        _builders.python("import sys; print(sys.version.split()[0])", name="python-version"),
        _builders.python("print(sum(i * i for i in range(10**6)))", name="sum-of-squares"),
        _builders.shell("echo to stderr >&2; exit 3", name="fails-with-3"),
        _builders.noop({"hello": "shoal"}, name="noop"),
        demo_tasks.area.spec(6, 7),
    ]
    token = (await asyncio.to_thread(token_file.read_text)).strip() if token_file else ""
    async with AsyncClient(address, token=token) as client:
        ids = await client.submit_batch(specs)
        tasks = await asyncio.gather(*(client.wait(i) for i in ids))
    table = Table(title=f"demo batch: {len(tasks)} tasks")
    for col in ("name", "state", "exit", "node", "output"):
        table.add_column(col)
    for t in tasks:
        output = returned_text(t) or t.result.stdout.strip() or t.result.stderr.strip()
        table.add_row(
            *plain(t.spec.name),
            state_text(t.state),
            *plain(str(t.result.exit_code), t.node_id, output[:60]),
        )
    console.print(table)
