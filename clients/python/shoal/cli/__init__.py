"""The `shoal` command. Signals, logging and config loading live here only.

Serving commands are in `up` and `serving` (their shared options in `options`), task
commands in `tasks` and `logs`, admin commands in `admin`, `tokens`, `schedules`, `store` and
`certs`, and how results are shown in `render`.
"""

from __future__ import annotations

from shoal._health_cli import health, status
from shoal.cli.app import app
from shoal.cli.discover import discover

app.command()(discover)
app.command()(health)
app.command()(status)

# Importing a module of commands registers them on `app`, and `shoal --help` lists them in
# that order: keep these imports in this order.
# isort: off
from shoal.cli import up  # noqa: E402
from shoal.cli import serving  # noqa: E402
from shoal.cli import tasks  # noqa: E402
from shoal.cli import listing  # noqa: E402
from shoal.cli import logs  # noqa: E402
from shoal.cli import admin  # noqa: E402

# isort: on
from shoal.cli.certs import app as certs_app  # noqa: E402
from shoal.cli.schedules import schedule_app  # noqa: E402
from shoal.cli.store import app as store_app  # noqa: E402
from shoal.cli.tokens import token_app  # noqa: E402

app.add_typer(token_app, name="token")
app.add_typer(certs_app, name="certs")
app.add_typer(schedule_app, name="schedule")
app.add_typer(admin.quota_app, name="quota")
app.add_typer(store_app, name="store")

__all__ = ["admin", "app", "listing", "logs", "main", "serving", "tasks", "up"]


def main() -> None:
    app()
