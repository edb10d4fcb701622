"""The coordinator on its LAN: advertises itself by mDNS and watches the nodes advertised there."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from zeroconf.asyncio import AsyncZeroconf

from shoal import __version__
from shoal._channel import open_channel
from shoal._health import Health, check_health
from shoal._mdns import Advertisement, Browser, decode_node, open_zeroconf
from shoal.config import CoordinatorSettings
from shoal.discovery import (
    COORDINATOR_SERVICE,
    NODE_SERVICE,
    CoordinatorAd,
    NodeAd,
    advertised_hosts,
)
from shoal.v1 import admin_pb2, node_pb2

__all__ = ["CoordinatorDiscovery"]

_log = logging.getLogger("shoal.coordinator")


@dataclass(eq=False)
class _Watched:
    """A discovered node and what its health check last said."""

    ad: NodeAd
    health: Health = Health.UNKNOWN
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class CoordinatorDiscovery:
    """Advertises the coordinator (`_shoal._tcp`, its cluster in TXT; unless `advertise` is
    False) and watches the nodes advertised for its cluster (`_shoal-node._tcp`): each one's
    gRPC health is checked every `health_interval` over a channel kept open, and `on_nodes`
    hears of every change (node id -> address). `async_start`, then `async_stop` (idempotent).
    """

    def __init__(
        self,
        settings: CoordinatorSettings,
        port: int,
        *,
        advertise: bool = True,
        on_nodes: Callable[[dict[str, str]], None] | None = None,
        health_interval: timedelta = timedelta(seconds=5),
        health_timeout: timedelta = timedelta(seconds=1),
    ) -> None:
        self._settings = settings
        self._port = port
        self._advertise = advertise
        self.on_nodes = on_nodes
        self._interval = health_interval.total_seconds()
        self._timeout = health_timeout.total_seconds()
        self._advertisement: Advertisement | None = None
        self._browser: Browser[NodeAd] | None = None
        self._watched: dict[str, _Watched] = {}  # by instance name
        self._follow: asyncio.Task[None] | None = None
        self._zc: AsyncZeroconf | None = None

    @property
    def advertisement(self) -> Advertisement | None:
        return self._advertisement

    async def async_start(self) -> None:
        s = self._settings
        hosts = await advertised_hosts(s.listen)
        self._zc = zc = open_zeroconf(s.listen)
        ad = CoordinatorAd(
            name="",
            hosts=tuple(hosts),
            port=self._port,
            cluster=s.cluster,
            version=__version__,
            tls=s.tls_cert is not None,
            auth=s.auth,
        )
        if self._advertise:
            self._advertisement = Advertisement(
                zc,
                COORDINATOR_SERVICE,
                f"{s.cluster} on {socket.gethostname()}",
                hosts=hosts,
                port=self._port,
                txt=ad.txt(),
            )
            self._advertisement.async_publish()
        self._browser = Browser(zc, NODE_SERVICE, decode_node)
        self._browser.async_start()
        self._follow = asyncio.create_task(self._follow_nodes(self._browser), name="shoal-mdns")

    def nodes(self) -> dict[str, admin_pb2.NodeStatus]:
        """Nodes advertised for this cluster, by node id, with their health and address."""
        out: dict[str, admin_pb2.NodeStatus] = {}
        for watched in self._watched.values():
            ad = watched.ad
            out[ad.node_id] = admin_pb2.NodeStatus(
                info=node_pb2.NodeInfo(
                    node_id=ad.node_id,
                    version=ad.version,
                    labels=ad.labels,
                    executors=ad.executors,
                    models=ad.models,
                ),
                connected=False,
                address=ad.address,
                health=admin_pb2.NodeHealth.Value(f"NODE_HEALTH_{watched.health.value}"),
            )
        return out

    async def async_stop(self) -> None:
        """Withdraw the advertisement (nodes learn it at once), stop watching, close."""
        follow, self._follow = self._follow, None
        if follow is not None:
            follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follow
        for name in list(self._watched):
            await self._unwatch(name)
        browser, self._browser = self._browser, None
        if browser is not None:
            await browser.async_close()
        advertisement, self._advertisement = self._advertisement, None
        if advertisement is not None:
            await advertisement.async_withdraw()
        zc, self._zc = self._zc, None
        if zc is not None:
            await zc.async_close()

    async def _follow_nodes(self, browser: Browser[NodeAd]) -> None:
        """Keep one health watcher per node advertised for this cluster."""
        while True:
            version = browser.version
            seen = {
                name: ad
                for name, ad in browser.seen.items()
                if ad.cluster == self._settings.cluster
            }
            for name in [n for n in self._watched if n not in seen]:
                _log.info("node=%s no longer advertised", self._watched[name].ad.node_id)
                await self._unwatch(name)
            for name, ad in seen.items():
                watched = self._watched.get(name)
                if watched is not None and watched.ad.address == ad.address:
                    watched.ad = ad  # capabilities changed, same endpoint
                    continue
                if watched is not None:
                    await self._unwatch(name)
                _log.info("node=%s discovered at %s", ad.node_id, ad.address)
                watched = _Watched(ad)
                watched.task = asyncio.create_task(self._watch_health(watched))
                self._watched[name] = watched
            if self.on_nodes is not None:
                self.on_nodes({w.ad.node_id: w.ad.address for w in self._watched.values()})
            await browser.async_changed(60.0, since=version)

    async def _unwatch(self, name: str) -> None:
        watched = self._watched.pop(name)
        if watched.task is not None:
            watched.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watched.task

    async def _watch_health(self, watched: _Watched) -> None:
        s = self._settings
        tls = watched.ad.tls  # what its service speaks, as it says: health is no secret
        channel = open_channel(
            watched.ad.address,
            max_message_bytes=1 << 16,
            tls_ca=s.tls_client_ca if tls else None,
            tls_cert=s.tls_cert if tls else None,
            tls_key=s.tls_key if tls else None,
        )
        async with channel:
            while True:
                health = await check_health(channel, timeout=self._timeout)
                if health != watched.health:
                    _log.info(
                        "node=%s health %s (was %s)",
                        watched.ad.node_id,
                        health.value,
                        watched.health.value,
                    )
                    watched.health = health
                await asyncio.sleep(self._interval)
