"""Admin commands on nodes and quotas: `nodes`, `drain`, `undrain`, `quota` and `usage`."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from shoal._console import console
from shoal.cli.app import CoordinatorOpt, JsonOpt, app, connect, run_async
from shoal.cli.render import breaker_text, node_state, plain, print_json, shown
from shoal.specs import to_duration
from shoal.v1 import admin_pb2, task_pb2

quota_app = typer.Typer(
    help="Limits on quota keys, mesh-wide (admin).", no_args_is_help=True, rich_markup_mode=None
)


@app.command()
def nodes(coordinator: CoordinatorOpt = None, as_json: JsonOpt = False) -> None:
    """List connected nodes, and nodes advertised on the LAN that have not joined."""

    async def main() -> Any:
        async with connect(coordinator) as client:
            return await client.nodes()

    listed = run_async(main())
    if as_json:
        print_json(listed)
        return
    table = Table()
    for col in ("node", "host", "executors", "labels", "load", "state", "notes", "address"):
        table.add_column(col, overflow="fold")
    for n in listed:
        notes = [breaker_text(b) for b in n.breakers]
        if functions := n.info.functions:
            more = f" (+{len(functions) - 3} more: --json)" if len(functions) > 3 else ""
            notes.append(f"functions {', '.join(functions[:3])}{more}")
        if n.stale_updates:
            notes.append(f"{n.stale_updates} stale updates rejected")
        if n.throttled:
            notes.append(f"{n.throttled} messages throttled")
        if n.throttled_by_load:
            floor = task_pb2.Priority.Name(n.min_priority).removeprefix("PRIORITY_")
            why = f" ({n.throttle_reason})" if n.throttle_reason else ""
            notes.append(f"machine busy{why}: takes {floor} priority or higher only")
        table.add_row(
            *plain(
                n.info.node_id,
                n.info.hostname,
                ",".join(n.info.executors),
                ",".join(f"{k}={v}" for k, v in sorted(n.info.labels.items())),
                f"{n.running}/{n.info.slots}" if n.connected else "",
            ),
            node_state(n),
            *plain("\n".join(notes), n.address),
        )
    console.print(table)


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
        async with connect(coordinator) as client:
            return await client.drain(node_id, grace=timedelta(seconds=grace), leave=leave)

    status = run_async(main())
    console.print(f"node {shown(status.info.node_id)} draining: {status.running} tasks running")


@app.command()
def undrain(node_id: str, coordinator: CoordinatorOpt = None) -> None:
    """Put a drained node back in service."""

    async def main() -> admin_pb2.NodeStatus:
        async with connect(coordinator) as client:
            return await client.undrain(node_id)

    console.print(f"node {shown(run_async(main()).info.node_id)} takes work again")


# -- tokens --------------------------------------------------------------------------------
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
        async with connect(coordinator) as client:
            return await client.set_quota(quota)

    console.print(f"quota on {escape(run_async(main()).key)} set")


@quota_app.command("ls")
def quota_ls(coordinator: CoordinatorOpt = None, as_json: JsonOpt = False) -> None:
    """List the quotas."""

    async def main() -> list[admin_pb2.Quota]:
        async with connect(coordinator) as client:
            return await client.quotas()

    listed = run_async(main())
    if as_json:
        print_json(listed)
        return
    table = Table()
    for col in ("key", *(title for _, title in _LIMITS), "fail fast"):
        table.add_column(col, overflow="fold")
    for q in listed:
        cells = [f"{getattr(q, name):g}" if getattr(q, name) else "-" for name, _ in _LIMITS]
        if q.rate:
            per = q.per.ToTimedelta().total_seconds() or 1.0
            cells[0] = f"{q.rate:g}/{per:g}s burst {q.burst or max(1, int(q.rate))}"
        table.add_row(*plain(q.key), *cells, "yes" if q.fail_fast else "")
    console.print(table)


@quota_app.command("rm")
def quota_rm(key: str, coordinator: CoordinatorOpt = None) -> None:
    """Remove the limits on a key."""

    async def main() -> admin_pb2.Quota:
        async with connect(coordinator) as client:
            return await client.delete_quota(key)

    console.print(f"quota on {escape(run_async(main()).key)} removed")


@app.command()
def usage(
    key: Annotated[str, typer.Argument(help="One key [every key]")] = "",
    coordinator: CoordinatorOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """What each quota key used per UTC day and month (admin)."""

    async def main() -> list[admin_pb2.KeyUsage]:
        async with connect(coordinator) as client:
            return await client.usage(key)

    listed = run_async(main())
    if as_json:
        print_json(listed)
        return
    table = Table()
    for col in ("key", "period", "requests", "tokens", "cost $", "running", "reserved"):
        table.add_column(col, overflow="fold")
    for u in listed:
        reserved = f"{u.reserved_tokens} tokens, ${u.reserved_cost:.4f}" if u.running else ""
        table.add_row(
            *plain(u.key, u.period),
            str(u.requests),
            str(u.tokens),
            f"{u.cost:.4f}",
            str(u.running),
            reserved,
        )
    console.print(table)
