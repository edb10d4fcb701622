"""Options and helpers of the commands that start processes (`up`, `coordinator`, `node`):
flags given override the config file and environment; logging is set up here."""

from __future__ import annotations

import enum
import logging
from typing import Annotated, Any

import typer

__all__ = [
    "Advertise",
    "AdvertiseOpt",
    "AuthOpt",
    "ClusterOpt",
    "HttpListenOpt",
    "VerboseOpt",
    "given",
    "setup_logging",
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


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


HttpListenOpt = Annotated[
    str | None,
    typer.Option(help="Serve the HTTP/JSON API and dashboard on host:port ('' for none)"),
]


AuthOpt = Annotated[
    bool | None,
    typer.Option("--auth/--no-auth", help="Require tokens (off is allowed on loopback only)"),
]


def given(**kwargs: Any) -> dict[str, Any]:
    """Flags that were given: they override the config file and environment."""
    return {k: v for k, v in kwargs.items() if v is not None}
