"""`shoal token`: create, list and revoke API tokens."""

from __future__ import annotations

import shlex
from datetime import timedelta
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from shoal._console import console, err_console
from shoal.cli.app import CoordinatorOpt, JsonOpt, connect, parse_labels, run_async
from shoal.cli.render import plain, print_json
from shoal.config import ClientSettings
from shoal.join import JoinLine, ca_fingerprint
from shoal.v1 import admin_pb2

token_app = typer.Typer(
    help="Create, list and revoke API tokens (admin).", no_args_is_help=True, rich_markup_mode=None
)

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
    node_id: Annotated[
        str,
        typer.Option(
            help="Node tokens: the node id [the name]; PREFIX* makes a pool token that nodes "
            "of any id beginning with PREFIX share (e.g. a Deployment's pods)"
        ),
    ] = "",
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
        labels=parse_labels(label or []),
    )
    if ttl is not None:
        request.ttl.FromTimedelta(_ttl(ttl))

    async def main() -> admin_pb2.CreateTokenResponse:
        async with connect(coordinator) as client:
            return await client.create_token(request)

    made = run_async(main())
    console.print(made.token, highlight=False, soft_wrap=True)
    if role == "node":
        settings = ClientSettings(coordinator=coordinator) if coordinator else ClientSettings()
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
        async with connect(coordinator) as client:
            return await client.tokens(include_revoked=revoked)

    listed = run_async(main())
    if as_json:
        print_json(listed)
        return
    table = Table()
    for col in ("name", "id", "role", "tenant", "node", "created", "expires", "revoked"):
        table.add_column(col)
    role_names = {v: k for k, v in _ROLE_NAMES.items()}
    for t in listed:
        table.add_row(
            *plain(t.name, t.id, role_names.get(t.role, "?"), t.tenant, t.node_id),
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
        async with connect(coordinator) as client:
            return await client.revoke_token(token)

    info = run_async(main())
    console.print(f"revoked {escape(info.name)} ({escape(info.id)})")


# -- schedules -----------------------------------------------------------------------------
