"""Commands that start processes: `coordinator` and `node` (`up`: up.py). Signals and logging
are set up here only."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from shoal._console import console, serving
from shoal._extras import needs_extra
from shoal._server import raise_open_files_limit
from shoal.cli.app import CoordinatorOpt, app, duration, parse_labels, run_async
from shoal.cli.options import (
    AdvertiseOpt,
    AuthOpt,
    ClusterOpt,
    HttpListenOpt,
    VerboseOpt,
    given,
    setup_logging,
)
from shoal.config import CoordinatorSettings, NodeSettings, default_data_dir
from shoal.errors import InvalidArgument
from shoal.join import JoinLine, ca_fingerprint, fetch_pinned_ca

if TYPE_CHECKING:
    pass


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

    setup_logging(verbose)
    raise_open_files_limit()
    server = CoordinatorServer(
        CoordinatorSettings(
            **given(
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

    setup_logging(verbose)
    raise_open_files_limit()
    joined = None
    if join is not None:
        joined, tls_ca = _joined(join, tls_ca)
    settings = NodeSettings(
        **given(
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
