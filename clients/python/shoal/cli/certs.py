"""`shoal certs`: create a CA and the certificates it signs."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from shoal._console import console, print_error
from shoal._extras import needs_extra
from shoal.config import default_data_dir
from shoal.errors import ShoalError

__all__ = ["app"]

app = typer.Typer(
    help="Create a CA and certificates for TLS and mTLS",
    no_args_is_help=True,
    rich_markup_mode=None,
)

DirOpt = Annotated[
    Path | None,
    typer.Option("--dir", help="Directory of the CA and certificates [default: DATA_DIR/certs]"),
]


def _dir(directory: Path | None) -> Path:
    return directory if directory is not None else default_data_dir() / "certs"


def _fail(err: ShoalError) -> typer.Exit:
    print_error(err)
    return typer.Exit(1)


def _q(path: Path) -> str:
    return escape(shlex.quote(str(path)))


@app.command("init")
def init(
    directory: DirOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing CA (its certificates stop working)")
    ] = False,
) -> None:
    """Create the CA that signs Shoal's certificates."""
    with needs_extra("coordinator"):
        from shoal import certs  # cryptography loads in a tenth of a second: only when needed

    directory = _dir(directory)
    try:
        cert = certs.init_ca(directory, force=force)
    except ShoalError as err:
        raise _fail(err) from None
    console.print(f"wrote {_q(cert)}")
    console.print(f"wrote {_q(directory / certs.CA_KEY)} (keep it secret)")
    console.print(
        "next: shoal certs issue coordinator --host HOST"
        + ("" if directory == _dir(None) else f" --dir {_q(directory)}"),
        soft_wrap=True,
    )


@app.command("issue")
def issue(
    name: Annotated[str, typer.Argument(help="Certificate name (its CN), e.g. coordinator")],
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="DNS name or IP the server is reached at (repeatable)"),
    ] = None,
    days: Annotated[int, typer.Option("--days", min=1, help="Days of validity")] = 365,
    directory: DirOpt = None,
) -> None:
    """Sign a certificate: with --host for a server, without for a client or node."""
    with needs_extra("coordinator"):
        from shoal import certs

    directory = _dir(directory)
    hosts = host or []
    try:
        cert, key = certs.issue(directory, name, hosts=hosts, days=days)
    except ShoalError as err:
        raise _fail(err) from None
    ca = directory / certs.CA_CERT
    console.print(f"wrote {_q(cert)}")
    console.print(f"wrote {_q(key)} (keep it secret)")
    if hosts:
        usage = (
            f"shoal coordinator --tls-cert {_q(cert)} --tls-key {_q(key)}"
            f" --tls-client-ca {_q(ca)} --require-client-cert"
        )
    else:
        # Client commands take TLS files from the environment or config, not flags.
        usage = (
            f"shoal node --tls-ca {_q(ca)} --tls-cert {_q(cert)} --tls-key {_q(key)}\n"
            f"     client commands and the SDK: SHOAL_TLS_CA={_q(ca)} SHOAL_TLS_CERT={_q(cert)}"
            f" SHOAL_TLS_KEY={_q(key)} (or tls_ca, tls_cert, tls_key in [client] of the config)"
        )
    console.print(f"use: {usage}", soft_wrap=True, highlight=False)
