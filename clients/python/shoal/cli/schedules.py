"""`shoal schedule`: periodic tasks, on cron or at an interval."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from shoal._console import console
from shoal.cli.app import CoordinatorOpt, JsonOpt, connect, run_async
from shoal.cli.render import plain, print_json, utc_time
from shoal.cli.specs import LabelOpt, PriorityOpt, PythonOpt, TenantOpt, TimeoutOpt, build_spec
from shoal.v1 import admin_pb2

schedule_app = typer.Typer(
    help="Periodic tasks: cron or interval (admin).", no_args_is_help=True, rich_markup_mode=None
)

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
    spec = build_spec(
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
        async with connect(coordinator) as client:
            return await client.create_schedule(schedule)

    made = run_async(main())
    console.print(f"schedule {escape(made.name)}: next run {utc_time(made.next_run)}")


@schedule_app.command("ls")
def schedule_ls(coordinator: CoordinatorOpt = None, as_json: JsonOpt = False) -> None:
    """List schedules."""

    async def main() -> list[admin_pb2.Schedule]:
        async with connect(coordinator) as client:
            return await client.schedules()

    listed = run_async(main())
    if as_json:
        print_json(listed)
        return
    table = Table()
    for col in ("name", "when", "next run", "last run", "runs", "skipped", "state"):
        table.add_column(col)
    for s in listed:
        when = s.cron if s.HasField("cron") else f"every {s.every.ToTimedelta()}"
        table.add_row(
            *plain(s.name, when),
            utc_time(s.next_run) if not s.paused else "",
            utc_time(s.last_run),
            str(s.runs),
            str(s.skipped),
            "paused" if s.paused else "active",
        )
    console.print(table)


def _schedule_action(action: str, name: str, coordinator: str | None) -> None:
    async def main() -> admin_pb2.Schedule:
        async with connect(coordinator) as client:
            return await client.schedule_action(action, name)

    made = run_async(main())
    console.print(f"schedule {escape(made.name)}: {action}d")


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
