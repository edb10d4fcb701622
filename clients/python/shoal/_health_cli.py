"""`shoal health ADDRESS`: a server's gRPC health, for container and supervisor checks."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from shoal._channel import open_channel
from shoal._console import console
from shoal._health import Health, check_health

__all__ = ["health"]

_MAX_MESSAGE_BYTES = 1 << 16  # a health answer is a few bytes


def health(
    address: Annotated[str, typer.Argument(help="HOST:PORT of a coordinator or node")],
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer")] = 3.0,
    tls_ca: Annotated[Path | None, typer.Option(help="CA of the server's certificate")] = None,
) -> None:
    """Print the server's health (SERVING, NOT_SERVING or UNKNOWN); exit 0 only if SERVING."""

    async def check() -> Health:
        async with open_channel(
            address, max_message_bytes=_MAX_MESSAGE_BYTES, tls_ca=tls_ca
        ) as channel:
            return await check_health(channel, timeout=timeout)

    said = asyncio.run(check())
    console.print(said.value, highlight=False)
    if said is not Health.SERVING:
        raise typer.Exit(1)
