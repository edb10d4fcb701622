"""`shoal discover`: the coordinators and nodes advertised on the LAN, with their health."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Annotated, Any

import grpc
import typer
from rich.table import Table

from shoal._channel import open_channel
from shoal._console import console
from shoal._health import Health, check_health
from shoal._mdns import Browser, decode_coordinator, decode_node, open_zeroconf
from shoal.cli.render import plain
from shoal.config import ClientSettings
from shoal.discovery import COORDINATOR_SERVICE, NODE_SERVICE, CoordinatorAd, NodeAd

__all__ = ["Found", "async_discover", "discover"]

_HEALTH_TIMEOUT = 1.0  # seconds each server has to answer its health check


@dataclass(frozen=True)
class Found:
    """What browsing the LAN found: each advertisement with its server's health."""

    coordinators: list[tuple[CoordinatorAd, Health]]
    nodes: list[tuple[NodeAd, Health]]

    def as_json(self) -> dict[str, Any]:
        return {
            "coordinators": [
                {
                    "name": ad.name,
                    "address": ad.address,
                    "addresses": list(ad.hosts),
                    "port": ad.port,
                    "cluster": ad.cluster,
                    "version": ad.version,
                    "tls": ad.tls,
                    "auth": ad.auth,
                    "health": health.value,
                }
                for ad, health in self.coordinators
            ],
            "nodes": [
                {
                    "name": ad.name,
                    "node_id": ad.node_id,
                    "address": ad.address,
                    "addresses": list(ad.hosts),
                    "port": ad.port,
                    "cluster": ad.cluster,
                    "version": ad.version,
                    "executors": list(ad.executors),
                    "labels": dict(ad.labels),
                    "models": list(ad.models),
                    "health": health.value,
                }
                for ad, health in self.nodes
            ],
        }


async def async_discover(browse_for: float, settings: ClientSettings) -> Found:
    """Browse both service types for `browse_for` seconds, then check each one's health."""
    zc = open_zeroconf("0.0.0.0:0")
    coordinators = Browser(zc, COORDINATOR_SERVICE, decode_coordinator)
    nodes = Browser(zc, NODE_SERVICE, decode_node)
    try:
        coordinators.async_start()
        nodes.async_start()
        await asyncio.sleep(browse_for)  # mDNS has no "that is all": browse for a while
        found_coordinators = sorted(coordinators.seen.values(), key=lambda c: (c.cluster, c.name))
        found_nodes = sorted(nodes.seen.values(), key=lambda n: (n.cluster, n.node_id))
    finally:
        await coordinators.async_close()
        await nodes.async_close()
        await zc.async_close()
    healths = await asyncio.gather(
        *(_coordinator_health(c, settings) for c in found_coordinators),
        *(_node_health(n, settings) for n in found_nodes),
    )
    return Found(
        list(zip(found_coordinators, healths[: len(found_coordinators)], strict=True)),
        list(zip(found_nodes, healths[len(found_coordinators) :], strict=True)),
    )


async def _coordinator_health(ad: CoordinatorAd, settings: ClientSettings) -> Health:
    return await _check(ad.address, ad.tls, settings)


async def _node_health(ad: NodeAd, settings: ClientSettings) -> Health:
    return await _check(ad.address, ad.tls, settings)


async def _check(address: str, tls: bool, settings: ClientSettings) -> Health:
    if tls and settings.tls_ca is None and settings.tls_cert is None:
        # Trusted by the system's roots, if at all.
        channel = grpc.aio.secure_channel(address, grpc.ssl_channel_credentials())
    else:
        channel = open_channel(
            address,
            max_message_bytes=1 << 16,
            tls_ca=settings.tls_ca if tls else None,
            tls_cert=settings.tls_cert if tls else None,
            tls_key=settings.tls_key if tls else None,
        )
    async with channel:
        return await check_health(channel, timeout=_HEALTH_TIMEOUT)


_COLOURS = {Health.SERVING: "green", Health.NOT_SERVING: "yellow", Health.UNKNOWN: "red"}


def _health(health: Health) -> str:
    return f"[{_COLOURS[health]}]{health.value}[/]"


def discover(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    timeout: Annotated[
        float, typer.Option(help="Seconds to browse before answering", min=0.1, max=60)
    ] = 2.0,
) -> None:
    """Coordinators and nodes advertised on the LAN (mDNS), their capabilities and health."""
    found = asyncio.run(async_discover(timeout, ClientSettings()))
    if as_json:
        print(json.dumps(found.as_json(), indent=2))
        return
    coordinators = Table(title="coordinators")
    for col in ("name", "cluster", "address", "version", "tls", "auth", "health"):
        coordinators.add_column(col, overflow="fold")
    for c, health in found.coordinators:
        coordinators.add_row(
            *plain(c.name.split(".", 1)[0], c.cluster, c.address, c.version),
            str(c.tls).lower(),
            str(c.auth).lower(),
            _health(health),
        )
    nodes = Table(title="nodes")
    for col in ("node", "cluster", "address", "executors", "labels", "models", "health"):
        nodes.add_column(col, overflow="fold")
    for n, health in found.nodes:
        nodes.add_row(
            *plain(
                n.node_id,
                n.cluster,
                n.address,
                ",".join(n.executors),
                ",".join(f"{k}={v}" for k, v in sorted(n.labels.items())),
                ",".join(n.models),
            ),
            _health(health),
        )
    console.print(coordinators)
    console.print(nodes)
