"""`shoal health ADDRESS`: a server's gRPC health, for container and supervisor checks; and
`shoal status`: which of the coordinators leads."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from shoal._channel import open_channel
from shoal._console import console
from shoal._health import Health, check_health
from shoal.config import ClientSettings, coordinator_target

__all__ = ["health", "status"]

_MAX_MESSAGE_BYTES = 1 << 16  # a health answer is a few bytes


def health(
    address: Annotated[str, typer.Argument(help="HOST:PORT of a coordinator or node")],
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer")] = 3.0,
    tls_ca: Annotated[Path | None, typer.Option(help="CA of the server's certificate")] = None,
) -> None:
    """Print the server's health (SERVING, NOT_SERVING or UNKNOWN); exit 0 only if SERVING."""

    said = asyncio.run(_check(address, timeout, tls_ca))
    console.print(said.value, highlight=False)
    if said is not Health.SERVING:
        raise typer.Exit(1)


_ROLES = {Health.SERVING: "leader", Health.NOT_SERVING: "standby", Health.UNKNOWN: "no answer"}


def status(
    coordinator: Annotated[
        str | None,
        typer.Option(
            "--coordinator",
            "-c",
            help="Coordinator addresses, comma-separated [env SHOAL_COORDINATOR]",
        ),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each answer")] = 3.0,
    tls_ca: Annotated[Path | None, typer.Option(help="CA of the servers' certificates")] = None,
) -> None:
    """Which of the coordinators leads and which stand by; exit 0 only if one leads."""
    settings = ClientSettings()
    addresses = coordinator_target(coordinator or settings.coordinator).split(",")

    async def check_all() -> list[Health]:
        ca = tls_ca or settings.tls_ca
        return list(await asyncio.gather(*(_check(a, timeout, ca) for a in addresses)))

    said = asyncio.run(check_all())
    for address, health in zip(addresses, said, strict=True):
        console.print(f"{_ROLES[health]:<10} {address}", highlight=False)
    if Health.SERVING not in said:
        raise typer.Exit(1)


async def _check(address: str, timeout: float, tls_ca: Path | None) -> Health:
    async with open_channel(
        address, max_message_bytes=_MAX_MESSAGE_BYTES, tls_ca=tls_ca
    ) as channel:
        return await check_health(channel, timeout=timeout)
