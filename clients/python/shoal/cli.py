"""The `shoal` command. Signals, logging and config loading live here only."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import json
import logging
import shlex
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.markup import escape
from rich.table import Table

from shoal import __version__, _builders
from shoal._certs_cli import app as certs_app
from shoal._client import AsyncClient
from shoal._console import console, err_console, print_error, serving
from shoal._discover_cli import discover
from shoal._extras import needs_extra
from shoal._health_cli import health
from shoal._output import chunk_bytes
from shoal._server import collect_seldom, raise_open_files_limit
from shoal._store_cli import app as store_app
from shoal.config import ClientSettings, CoordinatorSettings, NodeSettings
from shoal.errors import InvalidArgument, ShoalError
from shoal.join import JoinLine, ca_fingerprint
from shoal.specs import is_final, state_name, to_duration
from shoal.v1 import admin_pb2, task_pb2

if TYPE_CHECKING:
    from shoal.node.guard import ResourceGuard

# Help texts are plain text: rich markup would eat their "[default]" and "[env ...]" notes.
app = typer.Typer(
    help="Shoal: spread background work across machines.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
token_app = typer.Typer(
    help="Create, list and revoke API tokens (admin).", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(token_app, name="token")
app.add_typer(certs_app, name="certs")
schedule_app = typer.Typer(
    help="Periodic tasks: cron or interval (admin).", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(schedule_app, name="schedule")
quota_app = typer.Typer(
    help="Limits on quota keys, mesh-wide (admin).", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(quota_app, name="quota")
app.add_typer(store_app, name="store")
app.command()(discover)
app.command()(health)
_T = TypeVar("_T")

CoordinatorOpt = Annotated[
    str | None,
    typer.Option("--coordinator", "-c", help="Coordinator address [env SHOAL_COORDINATOR]"),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging")]
ClusterOpt = Annotated[
    str | None, typer.Option(help="Cluster name, as advertised on mDNS [default: default]")
]


class Advertise(enum.StrEnum):
    auto = "auto"
    on = "on"
    off = "off"


AdvertiseOpt = Annotated[
    Advertise | None,
    typer.Option(help="Advertise on mDNS: auto (unless listening on loopback only), on, off"),
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


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


def _client(coordinator: str | None) -> AsyncClient:
    # Someone waits at the terminal: ride out a restart, not a coordinator that is gone.
    return AsyncClient(coordinator, retry_for=timedelta(seconds=5))


def _run(coro: Awaitable[_T]) -> _T:
    """Run a coroutine; Shoal errors become a message and exit status 1."""
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except ShoalError as err:
        print_error(err)
        raise typer.Exit(1) from None


async def _until_signalled(
    *stops: Callable[[], Awaitable[None]], done: asyncio.Event | None = None
) -> None:
    """Wait for SIGINT or SIGTERM (or `done`), then run each stop in order.

    A second signal cancels the stops: whatever they were waiting for ends at once.
    """
    signalled = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signalled.set)
    waits = [asyncio.create_task(e.wait()) for e in (signalled, done) if e is not None]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
    err_console.print("stopping… (again to stop at once)")
    current = asyncio.current_task()
    assert current is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, current.cancel)
    for fn in stops:
        await fn()


def _labels(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def _duration(seconds: float | None) -> timedelta | None:
    return None if seconds is None else timedelta(seconds=seconds)


JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON list instead of a table")]


def _print_json(messages: Iterable[Message]) -> None:
    """The messages as a JSON list (proto JSON, as `get --json` and grpcurl print them)."""
    console.print_json(data=[json_format.MessageToDict(m) for m in messages])


# -- processes -----------------------------------------------------------------------------


AuthOpt = Annotated[
    bool | None,
    typer.Option("--auth/--no-auth", help="Require tokens (off is allowed on loopback only)"),
]


@app.command()
@serving
def up(
    listen: Annotated[str | None, typer.Option(help="Coordinator address to bind")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Where the embedded store lives")] = None,
    slots: Annotated[int | None, typer.Option(help="Concurrent tasks on the local node")] = None,
    auth: AuthOpt = None,
    demo: Annotated[bool, typer.Option(help="Run a short demo batch once started")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Start a coordinator and one local node in this process (loopback, embedded SQLite)."""
    with needs_extra("coordinator", "node"):
        from shoal.coordinator.server import CoordinatorServer
        from shoal.node.agent import NodeAgent

    _logging(verbose)
    raise_open_files_limit()
    coord = CoordinatorServer(
        CoordinatorSettings(**_given(listen=listen, data_dir=data_dir, auth=auth))
    )

    async def main() -> None:
        await coord.start()
        token_file = coord.admin_token_path if coord.settings.auth else None
        settings = NodeSettings(
            **_given(coordinator=coord.address, slots=slots, token_file=token_file)
        )
        if "guard_min_priority" not in settings.model_fields_set:
            # The local node runs what its own user asks for: a busy laptop holds back only
            # work below the default priority.
            settings = settings.model_copy(update={"guard_min_priority": "normal"})
        node = NodeAgent(settings)
        node.on_guard_change = functools.partial(_guard_changed, settings)
        try:
            await node.start()
        except BaseException:
            await node.stop()
            await coord.stop()
            raise
        console.print(f"[bold]Shoal is up[/bold]: gRPC [cyan]{coord.address}[/cyan]")
        console.print(f"  data dir    {coord.settings.data_dir}")
        if token_file is not None:
            console.print(f"  admin token {token_file} (mode 0600; the CLI finds it by itself)")
        console.print(f"  local node  {node.node_id} (health on 127.0.0.1:{node.port})")
        console.print(f"  guard       {_guard_summary(settings)}", highlight=False)
        console.print(
            f"  try: {_shoal_command()} run -c {coord.address} -- echo hello;  Ctrl-C to stop",
            highlight=False,
        )
        if demo:
            await asyncio.wait_for(node.connected.wait(), 10)
            await _demo(coord.address, token_file)
        collect_seldom()
        await _until_signalled(node.stop, coord.stop)

    _run(main())


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
    ]
    token = (await asyncio.to_thread(token_file.read_text)).strip() if token_file else ""
    async with AsyncClient(address, token=token) as client:
        ids = await client.submit_batch(specs)
        tasks = await asyncio.gather(*(client.wait(i) for i in ids))
    table = Table(title=f"demo batch: {len(tasks)} tasks")
    for col in ("name", "state", "exit", "node", "output"):
        table.add_column(col)
    for t in tasks:
        output = t.result.stdout.strip() or t.result.stderr.strip()
        if t.result.HasField("output"):
            output = json.dumps(json_format.MessageToDict(t.result.output))
        table.add_row(t.spec.name, _state(t.state), str(t.result.exit_code), t.node_id, output[:60])
    console.print(table)


def _given(**kwargs: Any) -> dict[str, Any]:
    """Flags that were given: they override the config file and environment."""
    return {k: v for k, v in kwargs.items() if v is not None}


@app.command()
@serving
def coordinator(
    listen: Annotated[str | None, typer.Option(help="Address to bind [127.0.0.1:7070]")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Where the store lives")] = None,
    auth: AuthOpt = None,
    tls_cert: Annotated[Path | None, typer.Option(help="Server certificate (PEM)")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Server key (PEM)")] = None,
    tls_client_ca: Annotated[Path | None, typer.Option(help="CA of client certificates")] = None,
    require_client_cert: Annotated[
        bool | None, typer.Option(help="mTLS: every client presents a certificate")
    ] = None,
    cluster: ClusterOpt = None,
    advertise: AdvertiseOpt = None,
    adopt: Annotated[
        bool | None,
        typer.Option(
            help="Dial the nodes advertised for its cluster (mDNS) and run their sessions"
        ),
    ] = None,
    node_address: Annotated[
        list[str] | None,
        typer.Option("--node", help="Dial the node at host:port of its service (repeatable)"),
    ] = None,
    reachable_at: Annotated[
        list[str] | None,
        typer.Option(
            "--reachable-at",
            help="host:port nodes dial this coordinator at, beyond its own (NAT, a proxy)",
        ),
    ] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run a coordinator."""
    with needs_extra("coordinator"):
        from shoal.coordinator.server import CoordinatorServer

    _logging(verbose)
    raise_open_files_limit()
    server = CoordinatorServer(
        CoordinatorSettings(
            **_given(
                listen=listen,
                data_dir=data_dir,
                auth=auth,
                tls_cert=tls_cert,
                tls_key=tls_key,
                tls_client_ca=tls_client_ca,
                require_client_cert=require_client_cert,
                cluster=cluster,
                advertise=advertise and advertise.value,
                adopt=adopt,
                nodes=node_address or None,
                reachable_at=reachable_at or None,
            )
        )
    )

    async def main() -> None:
        await server.start()
        console.print(f"coordinator listening on [cyan]{server.address}[/cyan]")
        if server.settings.auth:
            console.print(f"admin token in {server.admin_token_path}")
        collect_seldom()
        await _until_signalled(server.stop)

    _run(main())


@app.command()
@serving
def node(
    coordinator: CoordinatorOpt = None,
    join: Annotated[
        str | None,
        typer.Option(
            "--join",
            help="The line `shoal token create --role node` printed: shoal://HOST:PORT?token=...",
        ),
    ] = None,
    node_id: Annotated[str | None, typer.Option("--node-id", help="Stable node id")] = None,
    slots: Annotated[int | None, typer.Option(help="Concurrent tasks [cpu count]")] = None,
    label: Annotated[list[str] | None, typer.Option("--label", "-l", help="KEY=VALUE")] = None,
    executor: Annotated[
        list[str] | None,
        typer.Option("--executor", "-e", help="An executor to offer (repeatable) [every one]"),
    ] = None,
    listen: Annotated[str | None, typer.Option(help="Node service address")] = None,
    cluster: ClusterOpt = None,
    advertise: AdvertiseOpt = None,
    token_file: Annotated[
        Path | None, typer.Option(help="File holding this node's token [env SHOAL_NODE_TOKEN]")
    ] = None,
    tls_ca: Annotated[Path | None, typer.Option(help="CA of the coordinator's certificate")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="This node's certificate (mTLS)")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="This node's key (mTLS)")] = None,
    service_tls: Annotated[
        bool | None,
        typer.Option(
            "--service-tls",
            help="Serve the node's own service with TLS, with --tls-cert and --tls-key",
        ),
    ] = None,
    require_client_cert: Annotated[
        bool | None,
        typer.Option(
            "--require-client-cert",
            help="Callers of the node's service present a certificate of --tls-ca (mTLS)",
        ),
    ] = None,
    reachable_at: Annotated[
        list[str] | None,
        typer.Option(
            "--reachable-at",
            help="host:port coordinators dial this node at, beyond its own (NAT, a proxy)",
        ),
    ] = None,
    workdir: Annotated[Path | None, typer.Option(help="Where tasks run")] = None,
    drain_grace: Annotated[
        float | None,
        typer.Option(help="On SIGTERM, seconds running tasks may take before they are given back"),
    ] = None,
    standalone: Annotated[
        bool | None,
        typer.Option(
            "--standalone", help="No coordinator: run tasks sent to the node's own service only"
        ),
    ] = None,
    auth: Annotated[
        bool | None,
        typer.Option(
            "--auth/--no-auth",
            help="Callers of the node's service present its token (off: on loopback only)",
        ),
    ] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run a node that dials the coordinator and runs what it is assigned.

    Without --coordinator it finds the coordinator of its --cluster on the LAN by mDNS, and
    looks again before each reconnect (so it follows a coordinator that moves).

    SIGTERM or SIGINT drains it: it takes no new work, lets running tasks finish within the
    drain grace, gives the rest back to the coordinator, then exits; a second signal exits at
    once. `shoal drain NODE --leave` does the same from afar.

    With --standalone it holds no coordinator session: run tasks on it with
    `shoal.v1.Node/Execute` (grpcurl, or any gRPC client) and the node's token.
    """
    with needs_extra("node"):
        from shoal.node.agent import NodeAgent

    _logging(verbose)
    raise_open_files_limit()
    joined = _joined(join, tls_ca) if join is not None else None
    settings = NodeSettings(
        **_given(
            coordinator=joined.address if joined else coordinator,
            token=joined.token if joined else None,
            node_id=node_id,
            slots=slots,
            labels=_labels(label) if label else None,
            executors=executor or None,
            listen=listen,
            cluster=cluster,
            advertise=advertise and advertise.value,
            token_file=token_file,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            service_tls=service_tls,
            service_require_client_cert=require_client_cert,
            reachable_at=reachable_at or None,
            workdir=workdir,
            drain_grace=_duration(drain_grace),
            standalone=standalone,
            auth=auth,
        )
    )

    async def main() -> None:
        agent = NodeAgent(settings)
        try:
            await agent.start()
            collect_seldom()
            await _until_signalled(agent.shutdown, done=agent.left)
        finally:
            await agent.stop()
        if agent.refusal is not None:  # its coordinator refused it for good: say why, and end
            raise agent.refusal

    _run(main())


def _joined(join: str, tls_ca: Path | None) -> JoinLine:
    line = JoinLine.parse(join)
    if line.ca:
        # The node does not fetch the CA itself: the one it is given must be the one pinned.
        ca = tls_ca or NodeSettings().tls_ca
        if ca is None:
            raise InvalidArgument("the join line pins a CA (TLS): give its file with --tls-ca")
        if ca_fingerprint(ca.read_bytes()) != line.ca:
            raise InvalidArgument(f"{ca} is not the CA the join line pins ({line.ca})")
    return line


# -- tasks ---------------------------------------------------------------------------------


def _state(state: int) -> str:
    name = state_name(state)
    colour = {"SUCCEEDED": "green", "FAILED": "red", "TIMED_OUT": "red", "CANCELLED": "yellow"}
    return f"[{colour[name]}]{name}[/]" if name in colour else name


def _exit_code(task: task_pb2.Task) -> str:
    """The exit code of a task that ended after it started; "" for one that never ran."""
    if is_final(task.state) and task.HasField("started_at"):
        return str(task.result.exit_code)
    return ""


def _at(text: str | None) -> datetime | None:
    """`--at`: an ISO time (local unless it says otherwise), or +SECONDS from now."""
    if text is None:
        return None
    try:
        if text.startswith("+"):
            return datetime.now(UTC) + timedelta(seconds=float(text[1:]))
        when = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"expected an ISO time or +SECONDS, got {text!r}") from None
    return when if when.tzinfo else when.astimezone()


def _spec(
    command: list[str],
    python_code: str | None,
    *,
    name: str,
    priority: str,
    timeout: float | None,
    label: list[str] | None,
    key: str,
    tenant: str,
    after: list[str] | None,
    retries: int,
    queue_timeout: float | None,
    at: str | None,
    docker: str | None = None,
    http: str | None = None,
    method: str = "GET",
    tool: str | None = None,
    tool_input: str | None = None,
) -> task_pb2.TaskSpec:
    if priority not in _builders.PRIORITIES:
        raise typer.BadParameter(f"priority must be one of {', '.join(_builders.PRIORITIES)}")
    kinds = [
        k
        for k, v in (
            ("--python", python_code),
            ("--docker", docker),
            ("--http", http),
            ("--tool", tool),
        )
        if v is not None
    ]
    if len(kinds) > 1:
        raise typer.BadParameter(f"give one of {', '.join(kinds)}")
    if tool_input is not None and tool is None:
        raise typer.BadParameter("--input goes with --tool")
    common: dict[str, Any] = dict(
        name=name,
        priority=priority,
        timeout=_duration(timeout),
        labels=_labels(label or []),
        idempotency_key=key,
        tenant=tenant,
        depends_on=after or [],
        retry=_builders.retry(retries + 1) if retries else None,
        queue_timeout=_duration(queue_timeout),
        not_before=_at(at),
    )
    if python_code is not None:
        return _builders.python(python_code, args=command, **common)
    if docker is not None:
        return _builders.docker(docker, command, **common)
    if command and (http is not None or tool is not None):
        raise typer.BadParameter("--http and --tool take no command")
    if http is not None:
        return _builders.http(http, method=method, **common)
    if tool is not None:
        return _builders.tool(tool, _json_object(tool_input or "{}", "--input"), **common)
    if not command:
        raise typer.BadParameter(
            "give a command after --, or --python CODE, --docker IMAGE, --http URL or --tool NAME"
        )
    return _builders.shell(command, **common)


def _json_object(text: str, option: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as err:
        raise typer.BadParameter(f"{option}: not JSON: {err}") from None
    if not isinstance(value, dict):
        raise typer.BadParameter(f"{option}: expected a JSON object, got {type(value).__name__}")
    return value


NameOpt = Annotated[str, typer.Option(help="Task name")]
PriorityOpt = Annotated[str, typer.Option(help="critical|high|normal|low|background")]
TimeoutOpt = Annotated[float | None, typer.Option(help="Execution timeout in seconds")]
LabelOpt = Annotated[list[str] | None, typer.Option("--label", "-l", help="Required node label")]
PythonOpt = Annotated[str | None, typer.Option("--python", help="Run Python code instead")]
DockerOpt = Annotated[
    str | None,
    typer.Option("--docker", help="Run the command (after --) in a container of this image"),
]
HttpOpt = Annotated[str | None, typer.Option("--http", help="Make one HTTP request to this URL")]
MethodOpt = Annotated[str, typer.Option(help="The --http request's method")]
ToolOpt = Annotated[str | None, typer.Option("--tool", help="Call the tool of this name")]
InputOpt = Annotated[str | None, typer.Option("--input", help="The --tool call's input (JSON)")]
KeyOpt = Annotated[str, typer.Option("--key", help="Idempotency key")]
TenantOpt = Annotated[str, typer.Option(help="Tenant")]
AfterOpt = Annotated[
    list[str] | None, typer.Option("--after", help="Run after this task succeeds (repeatable)")
]
RetriesOpt = Annotated[int, typer.Option(help="Retry a failure up to N times, backing off")]
QueueTimeoutOpt = Annotated[
    float | None, typer.Option(help="Time out if not started within SECONDS")
]
AtOpt = Annotated[str | None, typer.Option(help="Not before this ISO time, or +SECONDS")]


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
) -> None:
    """Run a task, stream its output live, and exit with its exit code."""
    spec = _spec(
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
    )
    code = _run(_follow(coordinator, spec))
    raise typer.Exit(code)


def _teller() -> Callable[[task_pb2.Task], None]:
    """Prints why a task waits, on stderr; a reason said just before is not said again."""
    said = ""

    def tell(task: task_pb2.Task) -> None:
        nonlocal said
        if task.pending_reason != said:
            said = task.pending_reason
            err_console.print(f"[yellow]waiting[/yellow]: {escape(said)}", highlight=False)

    return tell


async def _telling(client: AsyncClient, task_ids: list[str]) -> None:
    """Say why the first of `task_ids` not final yet waits, while it does (until cancelled)."""
    tell = _teller()
    for task_id in task_ids:
        await client.wait_with_reasons(task_id, tell)


async def _follow(coordinator: str | None, spec: task_pb2.TaskSpec) -> int:
    async with _client(coordinator) as client:
        task = await client.submit(spec)
        err_console.print(f"[dim]task {task.id}[/dim]")
        teller = asyncio.create_task(_telling(client, [task.id]))
        try:
            async for event in client.watch(
                since=task.created_seq - 1, task_ids=[task.id], output=True
            ):
                if event.HasField("output"):
                    out = (
                        sys.stderr
                        if event.output.stream == task_pb2.OUTPUT_STREAM_STDERR
                        else sys.stdout
                    )
                    # The task's bytes as it wrote them, whatever their encoding.
                    out.buffer.write(chunk_bytes(event.output))
                    out.flush()
                elif is_final(event.state):
                    result = event.result
                    if spec.HasField("tool") and result.HasField("output"):
                        # A tool streams nothing: what it returned is its output.
                        console.print_json(data=json_format.MessageToDict(result.output))
                    if result.error and event.state != task_pb2.TASK_STATE_SUCCEEDED:
                        err_console.print(f"[red]{state_name(event.state)}[/red]: {result.error}")
                    return _process_exit(event.state, result)
        except asyncio.CancelledError:
            with contextlib.suppress(ShoalError):
                await client.cancel(task.id)
            raise
        finally:
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
    count: Annotated[int, typer.Option(help="Submit this many copies, in batches")] = 1,
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
        specs = _read_specs(file)
    else:
        one = _spec(
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
        )
        specs = [one] * count
    if not _run(_submit(coordinator, specs, wait)):
        raise typer.Exit(1)


def _read_specs(file: Path) -> list[task_pb2.TaskSpec]:
    """`--file`: one TaskSpec (proto JSON) or a list of them."""
    try:
        loaded = json.loads(file.read_text())
    except OSError as err:
        raise typer.BadParameter(f"{file}: {err.strerror}") from None
    except (ValueError, RecursionError) as err:
        raise typer.BadParameter(f"{file}: not JSON (or nested too deep): {err}") from None
    items = loaded if isinstance(loaded, list) else [loaded]
    specs = []
    for i, item in enumerate(items):
        where = f"{file}" + (f" [{i}]" if isinstance(loaded, list) else "")
        if not isinstance(item, dict):
            raise typer.BadParameter(
                f"{where}: expected a TaskSpec object (or a list of them), got"
                f" {type(item).__name__}"
            )
        try:
            specs.append(json_format.ParseDict(item, task_pb2.TaskSpec()))
        except (json_format.ParseError, RecursionError) as err:
            raise typer.BadParameter(f"{where}: {err}") from None
    if not specs:
        raise typer.BadParameter(f"{file}: no tasks in it")
    return specs


async def _submit(coordinator: str | None, specs: list[task_pb2.TaskSpec], wait: bool) -> bool:
    """Submit `specs`, print their ids (or, with `wait`, their outcomes); whether all is well:
    with `wait`, every task succeeded."""
    async with _client(coordinator) as client:
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
                done = progress.add_task("running", total=len(ids))
                tasks = []
                teller = asyncio.create_task(_telling(client, ids))
                try:
                    for coro in asyncio.as_completed([client.wait(i) for i in ids]):
                        tasks.append(await coro)
                        progress.advance(done)
                finally:
                    await _stopped(teller)
        if wait:
            counts: dict[str, int] = {}
            for t in tasks:
                counts[state_name(t.state)] = counts.get(state_name(t.state), 0) + 1
            console.print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
            return set(counts) == {"SUCCEEDED"}
        for task_id in ids:
            console.print(task_id)
        return True


@app.command()
def get(
    task_id: str,
    coordinator: CoordinatorOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the task as JSON")] = False,
) -> None:
    """Show one task."""

    async def main() -> task_pb2.Task:
        async with _client(coordinator) as client:
            return await client.get(task_id)

    task = _run(main())
    if as_json:
        console.print_json(json_format.MessageToJson(task))
        return
    table = Table(show_header=False, box=None)
    rows = [
        ("id", task.id),
        ("name", task.spec.name),
        ("kind", task.spec.WhichOneof("kind") or ""),
        ("state", _state(task.state)),
        ("node", task.node_id),
        ("attempt", f"{task.attempt.number}" if task.attempt.number else ""),
        ("after", ", ".join(task.depends_on)),
        ("retried", f"{len(task.attempts)} earlier attempt(s)" if task.attempts else ""),
        ("waiting", task.pending_reason),
        ("exit code", _exit_code(task)),
        ("error", task.result.error),
    ]
    for k, v in rows:
        if v:
            table.add_row(f"[bold]{k}[/bold]", v)
    console.print(table)
    if task.result.stdout:
        console.print("[bold]stdout[/bold]", markup=True)
        console.out(task.result.stdout, end="")
    if task.result.stderr:
        console.print("[bold]stderr[/bold]", markup=True)
        console.out(task.result.stderr, end="")


@app.command("wait")
def wait_for(task_id: str, coordinator: CoordinatorOpt = None) -> None:
    """Wait for a task to end, saying why it waits; exit with its exit code (as run does)."""

    async def main() -> task_pb2.Task:
        async with _client(coordinator) as client:
            return await client.wait_with_reasons(task_id, _teller())

    task = _run(main())
    console.print(f"{task.id} {_state(task.state)}", highlight=False)
    if task.result.error:
        err_console.print(f"[red]{state_name(task.state)}[/red]: {escape(task.result.error)}")
    raise typer.Exit(_process_exit(task.state, task.result))


def _process_exit(state: int, result: task_pb2.TaskResult) -> int:
    """0 for success, the task's own exit code when it failed with one, 124 for a timeout."""
    if state == task_pb2.TASK_STATE_SUCCEEDED:
        return 0
    if state == task_pb2.TASK_STATE_FAILED and result.exit_code > 0:
        return result.exit_code
    return 124 if state == task_pb2.TASK_STATE_TIMED_OUT else 1


@app.command()
def cancel(task_id: str, coordinator: CoordinatorOpt = None) -> None:
    """Cancel a task (a running one is killed on its node)."""

    async def main() -> task_pb2.Task:
        async with _client(coordinator) as client:
            return await client.cancel(task_id)

    task = _run(main())
    console.print(f"{task.id} {_state(task.state)}")


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
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None

    async def main() -> list[task_pb2.Task]:
        async with _client(coordinator) as client:
            return await client.list(states=states, tenant=tenant, limit=limit)

    tasks = _run(main())
    if as_json:
        _print_json(tasks)
        return
    table = Table()
    for col in ("id", "name", "kind", "state", "exit", "node", "created"):
        table.add_column(col)
    for t in tasks:
        table.add_row(
            t.id,
            t.spec.name,
            t.spec.WhichOneof("kind") or "",
            _state(t.state),
            _exit_code(t),
            t.node_id,
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
        async with _client(coordinator) as client:
            async for e in client.watch(since=since, task_ids=task or [], output=output):
                console.print(f"{e.seq} {_event(e)}", highlight=False)

    with contextlib.suppress(KeyboardInterrupt):
        _run(main())


def _event(e: task_pb2.Event) -> str:
    """One line for an event: a task's change or output, or a node, breaker or quota notice."""
    if e.HasField("node"):
        n = e.node
        if not n.throttled:
            return f"node {escape(n.node_id)} calm: takes every priority"
        floor = task_pb2.Priority.Name(n.min_priority).removeprefix("PRIORITY_")
        paused = f", {n.paused} paused" if n.paused else ""
        why = f" ({escape(n.reason)})" if n.reason else ""
        return (
            f"node {escape(n.node_id)} [yellow]throttled[/]{why}: takes {floor} or higher{paused}"
        )
    if e.HasField("breaker"):
        return f"breaker {escape(_breaker(e.breaker))}"
    if e.HasField("quota"):
        q = e.quota
        if q.limited:
            return f"quota {escape(q.key)} holds tasks back: {escape(q.reason)}"
        return f"quota {escape(q.key)} lets tasks pass again"
    what = escape(repr(e.output.data)) if e.HasField("output") else _state(e.state)
    node_part = f" node={e.node_id}" if e.node_id else ""
    return f"{e.task_id} {what}{node_part}"


@app.command()
def nodes(coordinator: CoordinatorOpt = None, as_json: JsonOpt = False) -> None:
    """List connected nodes, and nodes advertised on the LAN that have not joined."""

    async def main() -> Any:
        async with _client(coordinator) as client:
            return await client.nodes()

    listed = _run(main())
    if as_json:
        _print_json(listed)
        return
    table = Table()
    for col in ("node", "host", "executors", "labels", "load", "state", "notes", "address"):
        table.add_column(col, overflow="fold")
    for n in listed:
        notes = [_breaker(b) for b in n.breakers]
        if n.stale_updates:
            notes.append(f"{n.stale_updates} stale updates rejected")
        if n.throttled:
            notes.append(f"{n.throttled} messages throttled")
        if n.throttled_by_load:
            floor = task_pb2.Priority.Name(n.min_priority).removeprefix("PRIORITY_")
            why = f" ({n.throttle_reason})" if n.throttle_reason else ""
            notes.append(f"machine busy{why}: takes {floor} priority or higher only")
        table.add_row(
            n.info.node_id,
            n.info.hostname,
            ",".join(n.info.executors),
            ",".join(f"{k}={v}" for k, v in sorted(n.info.labels.items())),
            f"{n.running}/{n.info.slots}" if n.connected else "",
            _node_state(n),
            "\n".join(notes),
            n.address,
        )
    console.print(table)


def _node_state(n: admin_pb2.NodeStatus) -> str:
    """`draining`, `throttled` (its machine is busy), `throttled, 2 paused`, or `ready`; for a
    node discovered on the LAN but not joined, `not joined` and its health."""
    if not n.connected:
        health = admin_pb2.NodeHealth.Name(n.health).removeprefix("NODE_HEALTH_")
        return f"[dim]not joined[/dim] ({health})"
    if n.draining:
        return "[yellow]draining[/yellow]"
    if n.throttled_by_load or n.paused:
        paused = f", {n.paused} paused" if n.paused else ""
        return f"[yellow]throttled{paused}[/yellow]"
    return "ready"


def _breaker(b: task_pb2.Breaker) -> str:
    """`node:n1/shell open (5 failures, probe at 12:00:30)`."""
    state = task_pb2.BreakerState.Name(b.state).removeprefix("BREAKER_STATE_").lower()
    detail = f"{b.failures} failures"
    if b.state == task_pb2.BREAKER_STATE_OPEN:
        detail += f", probe at {_when(b.retry_at)}"
    return f"{b.key} {state} ({detail})"


@app.command()
def drain(
    node_id: Annotated[str, typer.Argument(help="The node to drain")],
    grace: Annotated[
        float, typer.Option(help="Seconds running tasks may take before they are given back")
    ] = 30.0,
    leave: Annotated[bool, typer.Option(help="End the node's process once drained")] = False,
    coordinator: CoordinatorOpt = None,
) -> None:
    """Take a node out of service: no new work; running tasks finish or are given back."""

    async def main() -> admin_pb2.NodeStatus:
        async with _client(coordinator) as client:
            return await client.drain(node_id, grace=timedelta(seconds=grace), leave=leave)

    status = _run(main())
    console.print(f"node {status.info.node_id} draining: {status.running} tasks running")


@app.command()
def undrain(node_id: str, coordinator: CoordinatorOpt = None) -> None:
    """Put a drained node back in service."""

    async def main() -> admin_pb2.NodeStatus:
        async with _client(coordinator) as client:
            return await client.undrain(node_id)

    console.print(f"node {_run(main()).info.node_id} takes work again")


# -- tokens --------------------------------------------------------------------------------

_ROLE_NAMES = {
    "admin": admin_pb2.ROLE_ADMIN,
    "submitter": admin_pb2.ROLE_SUBMITTER,
    "reader": admin_pb2.ROLE_READER,
    "node": admin_pb2.ROLE_NODE,
}
_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _ttl(text: str) -> timedelta:
    number, unit = text[:-1], text[-1:]
    if unit not in _TTL_UNITS or not number.isdigit() or int(number) <= 0:
        raise typer.BadParameter(f"expected a duration such as 90m, 12h or 30d, got {text!r}")
    return timedelta(seconds=int(number) * _TTL_UNITS[unit])


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Argument(help="A name for the token (shown in the audit trail)")],
    role: Annotated[str, typer.Option(help="admin|submitter|reader|node")] = "submitter",
    tenant: Annotated[str, typer.Option(help="Limit a submitter or reader to a tenant")] = "",
    node_id: Annotated[str, typer.Option(help="Node tokens: the node id [the name]")] = "",
    executor: Annotated[
        list[str] | None, typer.Option("--executor", help="Node tokens: an allowed executor")
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", "-l", help="Node tokens: an allowed KEY=VALUE")
    ] = None,
    ttl: Annotated[str | None, typer.Option(help="Expire after e.g. 90m, 12h, 30d")] = None,
    join_address: Annotated[
        str | None,
        typer.Option(
            help="Node tokens: HOST:PORT new nodes dial, in the join line [--coordinator]"
        ),
    ] = None,
    coordinator: CoordinatorOpt = None,
) -> None:
    """Create a token and print it (it is shown only once); for a node, also the line to run
    on the new machine."""
    if role not in _ROLE_NAMES:
        raise typer.BadParameter(f"role must be one of {', '.join(_ROLE_NAMES)}")
    request = admin_pb2.CreateTokenRequest(
        name=name,
        role=_ROLE_NAMES[role],
        tenant=tenant,
        node_id=node_id,
        executors=executor or [],
        labels=_labels(label or []),
    )
    if ttl is not None:
        request.ttl.FromTimedelta(_ttl(ttl))

    async def main() -> admin_pb2.CreateTokenResponse:
        async with _client(coordinator) as client:
            return await client.create_token(request)

    made = _run(main())
    console.print(made.token, highlight=False, soft_wrap=True)
    if role == "node":
        settings = ClientSettings(**_given(coordinator=coordinator))
        ca = ca_fingerprint(settings.tls_ca.read_bytes()) if settings.tls_ca else ""
        line = JoinLine(join_address or settings.coordinator, made.token, ca)
        err_console.print("On the new machine, run:", highlight=False)
        err_console.print(
            f"  shoal node --join {shlex.quote(line.url())}",
            highlight=False,
            soft_wrap=True,
            markup=False,
        )
    err_console.print(
        f"[dim]token {escape(repr(made.info.name))} ({role}); it is not shown again. Use it as"
        f" {'SHOAL_NODE_TOKEN' if role == 'node' else 'SHOAL_TOKEN'}=... or"
        " `authorization: Bearer ...`[/dim]"
    )


@token_app.command("ls")
def token_ls(
    coordinator: CoordinatorOpt = None,
    revoked: Annotated[bool, typer.Option(help="Include revoked tokens")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List tokens (never their secrets)."""

    async def main() -> list[admin_pb2.TokenInfo]:
        async with _client(coordinator) as client:
            return await client.tokens(include_revoked=revoked)

    listed = _run(main())
    if as_json:
        _print_json(listed)
        return
    table = Table()
    for col in ("name", "id", "role", "tenant", "node", "created", "expires", "revoked"):
        table.add_column(col)
    role_names = {v: k for k, v in _ROLE_NAMES.items()}
    for t in listed:
        table.add_row(
            t.name,
            t.id,
            role_names.get(t.role, "?"),
            t.tenant,
            t.node_id,
            *(
                t.ToDatetime().strftime("%Y-%m-%d %H:%M") if t.ByteSize() else ""
                for t in (t.created_at, t.expires_at, t.revoked_at)
            ),
        )
    console.print(table)


@token_app.command("revoke")
def token_revoke(
    token: Annotated[str, typer.Argument(help="The token's name or id")],
    coordinator: CoordinatorOpt = None,
) -> None:
    """Revoke a token: calls made with it fail from now on."""

    async def main() -> admin_pb2.TokenInfo:
        async with _client(coordinator) as client:
            return await client.revoke_token(token)

    info = _run(main())
    console.print(f"revoked {info.name} ({info.id})")


# -- schedules -----------------------------------------------------------------------------

_OVERLAP = {"skip": admin_pb2.Schedule.OVERLAP_SKIP, "allow": admin_pb2.Schedule.OVERLAP_ALLOW}
_CATCH_UP = {
    "one": admin_pb2.Schedule.CATCH_UP_ONE,
    "all": admin_pb2.Schedule.CATCH_UP_ALL,
    "none": admin_pb2.Schedule.CATCH_UP_NONE,
}


@schedule_app.command("create")
def schedule_create(
    name: Annotated[str, typer.Argument(help="A unique name")],
    command: Annotated[list[str] | None, typer.Argument(help="Command and arguments")] = None,
    cron: Annotated[str | None, typer.Option(help="Cron expression, e.g. '*/5 * * * *'")] = None,
    every: Annotated[float | None, typer.Option(help="Interval in seconds")] = None,
    tz: Annotated[str, typer.Option(help="Timezone of the cron expression")] = "UTC",
    overlap: Annotated[str, typer.Option(help="skip|allow a run while one is going")] = "skip",
    catch_up: Annotated[str, typer.Option(help="Missed runs: one|all|none")] = "one",
    python_code: PythonOpt = None,
    priority: PriorityOpt = "normal",
    timeout: TimeoutOpt = None,
    label: LabelOpt = None,
    tenant: TenantOpt = "",
    coordinator: CoordinatorOpt = None,
) -> None:
    """Submit a task on a cron expression or at an interval."""
    if (cron is None) == (every is None):
        raise typer.BadParameter("give --cron or --every")
    if overlap not in _OVERLAP or catch_up not in _CATCH_UP:
        raise typer.BadParameter("--overlap is skip|allow, --catch-up is one|all|none")
    spec = _spec(
        command or [],
        python_code,
        name=name,
        priority=priority,
        timeout=timeout,
        label=label,
        key="",
        tenant=tenant,
        after=None,
        retries=0,
        queue_timeout=None,
        at=None,
    )
    schedule = admin_pb2.Schedule(
        name=name,
        spec=spec,
        timezone=tz,
        overlap=_OVERLAP[overlap],
        catch_up=_CATCH_UP[catch_up],
    )
    if cron is not None:
        schedule.cron = cron
    else:
        schedule.every.FromTimedelta(timedelta(seconds=every or 0))

    async def main() -> admin_pb2.Schedule:
        async with _client(coordinator) as client:
            return await client.create_schedule(schedule)

    made = _run(main())
    console.print(f"schedule {made.name}: next run {_when(made.next_run)}")


def _when(ts: Any) -> str:
    return ts.ToDatetime().strftime("%Y-%m-%d %H:%M:%S UTC") if ts.ByteSize() else ""


@schedule_app.command("ls")
def schedule_ls(coordinator: CoordinatorOpt = None, as_json: JsonOpt = False) -> None:
    """List schedules."""

    async def main() -> list[admin_pb2.Schedule]:
        async with _client(coordinator) as client:
            return await client.schedules()

    listed = _run(main())
    if as_json:
        _print_json(listed)
        return
    table = Table()
    for col in ("name", "when", "next run", "last run", "runs", "skipped", "state"):
        table.add_column(col)
    for s in listed:
        when = s.cron if s.HasField("cron") else f"every {s.every.ToTimedelta()}"
        table.add_row(
            s.name,
            when,
            _when(s.next_run) if not s.paused else "",
            _when(s.last_run),
            str(s.runs),
            str(s.skipped),
            "paused" if s.paused else "active",
        )
    console.print(table)


def _schedule_action(action: str, name: str, coordinator: str | None) -> None:
    async def main() -> admin_pb2.Schedule:
        async with _client(coordinator) as client:
            return await client.schedule_action(action, name)

    made = _run(main())
    console.print(f"schedule {made.name}: {action}d")


@schedule_app.command("rm")
def schedule_rm(name: str, coordinator: CoordinatorOpt = None) -> None:
    """Delete a schedule (tasks it submitted are untouched)."""
    _schedule_action("delete", name, coordinator)


@schedule_app.command("pause")
def schedule_pause(name: str, coordinator: CoordinatorOpt = None) -> None:
    """Stop a schedule firing until it is resumed."""
    _schedule_action("pause", name, coordinator)


@schedule_app.command("resume")
def schedule_resume(name: str, coordinator: CoordinatorOpt = None) -> None:
    """Resume a paused schedule from now on."""
    _schedule_action("resume", name, coordinator)


# -- quotas --------------------------------------------------------------------------------

_LIMITS = (
    ("rate", "rate"),
    ("concurrency", "concurrency"),
    ("requests_per_day", "requests/day"),
    ("tokens_per_minute", "tokens/min"),
    ("tokens_per_day", "tokens/day"),
    ("cost_per_day", "$/day"),
    ("cost_per_month", "$/month"),
)


@quota_app.command("set")
def quota_set(
    key: Annotated[str, typer.Argument(help="e.g. provider:openai, tenant:acme, team:ml")],
    rate: Annotated[float, typer.Option(help="Tasks per --per seconds (token bucket)")] = 0,
    per: Annotated[float, typer.Option(help="Seconds the rate is counted over")] = 1.0,
    burst: Annotated[int, typer.Option(help="Tasks at once above the rate [the rate]")] = 0,
    concurrency: Annotated[int, typer.Option(help="Tasks running at once")] = 0,
    requests_per_day: Annotated[int, typer.Option(help="Dispatches per UTC day")] = 0,
    tokens_per_minute: Annotated[int, typer.Option(help="LLM tokens per minute")] = 0,
    tokens_per_day: Annotated[int, typer.Option(help="LLM tokens per UTC day")] = 0,
    cost_per_day: Annotated[float, typer.Option(help="Dollars per UTC day")] = 0,
    cost_per_month: Annotated[float, typer.Option(help="Dollars per month")] = 0,
    fail_fast: Annotated[bool, typer.Option(help="Fail tasks over it instead of waiting")] = False,
    coordinator: CoordinatorOpt = None,
) -> None:
    """Set the limits on a key (0 = no limit); tasks over one wait, saying why."""
    quota = admin_pb2.Quota(
        key=key,
        rate=rate,
        per=to_duration(timedelta(seconds=per)),
        burst=burst,
        concurrency=concurrency,
        requests_per_day=requests_per_day,
        tokens_per_minute=tokens_per_minute,
        tokens_per_day=tokens_per_day,
        cost_per_day=cost_per_day,
        cost_per_month=cost_per_month,
        fail_fast=fail_fast,
    )

    async def main() -> admin_pb2.Quota:
        async with _client(coordinator) as client:
            return await client.set_quota(quota)

    console.print(f"quota on {_run(main()).key} set")


@quota_app.command("ls")
def quota_ls(coordinator: CoordinatorOpt = None, as_json: JsonOpt = False) -> None:
    """List the quotas."""

    async def main() -> list[admin_pb2.Quota]:
        async with _client(coordinator) as client:
            return await client.quotas()

    listed = _run(main())
    if as_json:
        _print_json(listed)
        return
    table = Table()
    for col in ("key", *(title for _, title in _LIMITS), "fail fast"):
        table.add_column(col, overflow="fold")
    for q in listed:
        cells = [f"{getattr(q, name):g}" if getattr(q, name) else "-" for name, _ in _LIMITS]
        if q.rate:
            per = q.per.ToTimedelta().total_seconds() or 1.0
            cells[0] = f"{q.rate:g}/{per:g}s burst {q.burst or max(1, int(q.rate))}"
        table.add_row(q.key, *cells, "yes" if q.fail_fast else "")
    console.print(table)


@quota_app.command("rm")
def quota_rm(key: str, coordinator: CoordinatorOpt = None) -> None:
    """Remove the limits on a key."""

    async def main() -> admin_pb2.Quota:
        async with _client(coordinator) as client:
            return await client.delete_quota(key)

    console.print(f"quota on {_run(main()).key} removed")


@app.command()
def usage(
    key: Annotated[str, typer.Argument(help="One key [every key]")] = "",
    coordinator: CoordinatorOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """What each quota key used per UTC day and month (admin)."""

    async def main() -> list[admin_pb2.KeyUsage]:
        async with _client(coordinator) as client:
            return await client.usage(key)

    listed = _run(main())
    if as_json:
        _print_json(listed)
        return
    table = Table()
    for col in ("key", "period", "requests", "tokens", "cost $", "running", "reserved"):
        table.add_column(col, overflow="fold")
    for u in listed:
        reserved = f"{u.reserved_tokens} tokens, ${u.reserved_cost:.4f}" if u.running else ""
        table.add_row(
            u.key,
            u.period,
            str(u.requests),
            str(u.tokens),
            f"{u.cost:.4f}",
            str(u.running),
            reserved,
        )
    console.print(table)


def main() -> None:
    app()
