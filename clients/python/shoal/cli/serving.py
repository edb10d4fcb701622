"""Commands that start processes: `up`, `coordinator` and `node`. Signals and logging
are set up here only."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import json
import logging
import shlex
import shutil
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from google.protobuf import json_format
from rich.table import Table

from shoal import _builders
from shoal._client import AsyncClient
from shoal._console import console, err_console, serving
from shoal._extras import needs_extra
from shoal._server import collect_seldom, raise_open_files_limit
from shoal._signals import until_signalled
from shoal.cli.app import CoordinatorOpt, app, duration, parse_labels, run_async
from shoal.cli.render import state_text
from shoal.config import CoordinatorSettings, NodeSettings, default_data_dir
from shoal.errors import InvalidArgument
from shoal.join import JoinLine, ca_fingerprint, fetch_pinned_ca

if TYPE_CHECKING:
    from shoal.coordinator.server import CoordinatorServer
    from shoal.node.agent import NodeAgent
    from shoal.node.guard import ResourceGuard

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


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


HttpListenOpt = Annotated[
    str | None,
    typer.Option(help="Serve the HTTP/JSON API and dashboard on host:port ('' for none)"),
]
_DASHBOARD_PORT = 7080


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
    http_listen: HttpListenOpt = None,
    demo: Annotated[bool, typer.Option(help="Run a short demo batch once started")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Start a coordinator and one local node in this process (loopback, embedded SQLite)."""
    with needs_extra("coordinator", "node"):
        from shoal.coordinator.server import CoordinatorServer
        from shoal.node.agent import NodeAgent

    _logging(verbose)
    raise_open_files_limit()
    coord_settings = CoordinatorSettings(
        **_given(listen=listen, data_dir=data_dir, auth=auth, http_listen=http_listen)
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
                **_given(coordinator=coord.address, slots=slots, token_file=token_file)
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
    if token_file is not None:
        console.print(f"  admin token {token_file} (mode 0600; the CLI finds it by itself)")
    console.print(f"  local node  {node.node_id} (health on 127.0.0.1:{node.port})")
    console.print(f"  guard       {_guard_summary(settings)}", highlight=False)
    console.print(
        f"  try: {_shoal_command()} run -c {address} -- echo hello;  Ctrl-C to stop",
        highlight=False,
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
        table.add_row(
            t.spec.name, state_text(t.state), str(t.result.exit_code), t.node_id, output[:60]
        )
    console.print(table)


def _given(**kwargs: Any) -> dict[str, Any]:
    """Flags that were given: they override the config file and environment."""
    return {k: v for k, v in kwargs.items() if v is not None}


@app.command()
@serving
def coordinator(
    listen: Annotated[str | None, typer.Option(help="Address to bind [127.0.0.1:7070]")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Where the store lives")] = None,
    store: Annotated[
        str | None,
        typer.Option(help="postgresql://user@host/db to share a store with standby coordinators"),
    ] = None,
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
    http_listen: HttpListenOpt = None,
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
                store=store,
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
                http_listen=http_listen,
            )
        )
    )

    async def main() -> None:
        await server.start()
        console.print(f"coordinator listening on [cyan]{server.address}[/cyan]")
        if server.http_url:
            console.print(f"dashboard: [cyan]{server.http_url}[/cyan]")
        if server.settings.auth:
            console.print(f"admin token in {server.admin_token_path}")
        await server.run()
        if server.deposed.is_set():
            raise typer.Exit(1)  # another coordinator leads: a supervisor starts this one again

    run_async(main())


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
    import_: Annotated[
        list[str] | None,
        typer.Option("--import", help="A module whose @shoal.task functions to run (repeatable)"),
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
    joined = None
    if join is not None:
        joined, tls_ca = _joined(join, tls_ca)
    settings = NodeSettings(
        **_given(
            coordinator=joined.address if joined else coordinator,
            token=joined.token if joined else None,
            node_id=node_id,
            slots=slots,
            labels=parse_labels(label) if label else None,
            executors=executor or None,
            imports=import_ or None,
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
            drain_grace=duration(drain_grace),
            standalone=standalone,
            auth=auth,
        )
    )

    async def main() -> None:
        # Its coordinator may refuse it for good: run() raises why, and the command ends.
        await NodeAgent(settings).run()

    run_async(main())


# -- tasks ---------------------------------------------------------------------------------


def _joined(join: str, tls_ca: Path | None) -> tuple[JoinLine, Path | None]:
    """The join line, and the CA file to dial it with: the one given, which must be the one
    the line pins, or else the pinned one fetched from the coordinator."""
    line = JoinLine.parse(join)
    if not line.ca:
        return line, tls_ca
    ca = tls_ca or NodeSettings().tls_ca
    if ca is not None:
        if ca_fingerprint(ca.read_bytes()) != line.ca:
            raise InvalidArgument(f"{ca} is not the CA the join line pins ({line.ca})")
        return line, ca
    pem = fetch_pinned_ca(line.address, line.ca)
    fetched = default_data_dir() / f"ca-{line.ca.removeprefix('sha256:')[:16]}.pem"
    fetched.parent.mkdir(parents=True, exist_ok=True)
    fetched.write_bytes(pem)
    return line, fetched
