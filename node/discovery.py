"""The node on its LAN: advertises its service by mDNS, and finds its coordinator there."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import timedelta

from zeroconf.asyncio import AsyncZeroconf

from shoal._channel import open_channel
from shoal._health import Health, check_health
from shoal._mdns import Advertisement, Browser, decode_coordinator, open_zeroconf
from shoal.config import DEFAULT_COORDINATOR, NodeSettings
from shoal.discovery import (
    COORDINATOR_SERVICE,
    NODE_SERVICE,
    AmbiguousCoordinator,
    CoordinatorAd,
    NodeAd,
    advertised_hosts,
    advertises,
    choose_coordinator,
)
from shoal.v1 import node_pb2

__all__ = ["CoordinatorFinder", "NodeDiscovery", "node_ad"]

_log = logging.getLogger("shoal.node")

_WAIT_NOTICE = 3.0  # seconds without a coordinator before the node says it waits for one
_RECHECK_AMBIGUOUS = 2.0  # seconds between two looks at several coordinators of one cluster
_RECHECK_STANDBY = 0.25  # seconds between two looks at coordinators none of which serves
_HEALTH_TIMEOUT = 1.0  # seconds a candidate coordinator has to answer its health check
_REFRESH_EVERY = 5.0  # seconds between two looks at whether the node's capabilities changed


def node_ad(
    info: node_pb2.NodeInfo, *, cluster: str, hosts: list[str], port: int, tls: bool = False
) -> NodeAd:
    """What a node advertises, from its Info."""
    return NodeAd(
        name=info.node_id,
        hosts=tuple(hosts),
        port=port,
        node_id=info.node_id,
        cluster=cluster,
        version=info.version,
        executors=tuple(info.executors),
        labels=dict(info.labels),
        models=tuple(dict.fromkeys([*info.models, *info.ollama_models])),
        tls=tls,
    )


_LOCAL = CoordinatorAd("this machine", ("127.0.0.1",), int(DEFAULT_COORDINATOR.rsplit(":", 1)[1]))


class CoordinatorFinder:
    """Finds the coordinator that advertises a cluster, by browsing `_shoal._tcp`.

    An advertisement whose coordinator no longer answers (it died without saying goodbye)
    does not count when there are several: only those that answer their health check do.
    Coordinators sharing a store all advertise, the leader SERVING and the standbys not: the
    node follows the leader, and looks again every moment while none serves (a takeover).
    """

    def __init__(self, zc: AsyncZeroconf, settings: NodeSettings) -> None:
        self._settings = settings
        self._browser = Browser(zc, COORDINATOR_SERVICE, decode_coordinator)
        self._ambiguous: tuple[str, ...] = ()
        self._chosen = ""

    def async_start(self) -> None:
        self._browser.async_start()

    async def async_close(self) -> None:
        await self._browser.async_close()

    async def async_find(self) -> CoordinatorAd:
        """Wait until exactly one coordinator of the cluster is advertised (and, among
        several, answers), and return it. Says so in the log while it waits."""
        cluster = self._settings.cluster
        notice_at = time.monotonic() + _WAIT_NOTICE
        while True:
            version = self._browser.version
            seen = list(self._browser.seen.values())
            try:
                chosen = choose_coordinator(seen, cluster)
                self._ambiguous = ()
            except AmbiguousCoordinator as err:
                chosen = await self._among(err)
            if chosen is None and not self._ambiguous and await self._serving(_LOCAL):
                chosen = _LOCAL  # one on this machine, bound to loopback, advertises nothing
            if chosen is not None:
                if f"{chosen.name}@{chosen.address}" != self._chosen:
                    self._chosen = f"{chosen.name}@{chosen.address}"
                    _log.info(
                        "found coordinator %r of cluster %r at %s (tls=%s auth=%s)",
                        chosen.name,
                        cluster,
                        chosen.address,
                        chosen.tls,
                        chosen.auth,
                    )
                    s = self._settings
                    if chosen.tls and s.tls_ca is None and s.tls_cert is None:
                        _log.warning("that coordinator requires TLS: give the node --tls-ca")
                return chosen
            wait = _RECHECK_AMBIGUOUS if self._ambiguous else notice_at - time.monotonic()
            if any(c.cluster == cluster for c in seen) and not self._ambiguous:
                # Advertised, but none serves: standbys, one of which is taking over.
                wait = _RECHECK_STANDBY
            elif wait <= 0:
                others = sorted({f"{c.name} ({c.cluster})" for c in seen})
                _log.warning(
                    "no coordinator of cluster %r advertised on mDNS yet%s; still looking",
                    cluster,
                    f" (seen: {', '.join(others)})" if others else "",
                )
                notice_at = time.monotonic() + 60.0
                wait = 60.0
            # Look again every few seconds anyway: a coordinator on loopback says nothing.
            await self._browser.async_changed(min(wait, 5.0), since=version)

    async def _among(self, ambiguous: AmbiguousCoordinator) -> CoordinatorAd | None:
        """The one of several candidates that answers; None (and an error) if not one."""
        answers = await asyncio.gather(*(self._serving(c) for c in ambiguous.candidates))
        live = [c for c, ok in zip(ambiguous.candidates, answers, strict=True) if ok]
        try:
            chosen = choose_coordinator(live, self._settings.cluster)
        except AmbiguousCoordinator as err:
            names = tuple(c.name for c in err.candidates)
            if names != self._ambiguous:
                _log.error("cannot choose a coordinator: %s", err.message)
            self._ambiguous = names
            return None
        self._ambiguous = ()
        return chosen

    async def _serving(self, ad: CoordinatorAd) -> bool:
        s = self._settings
        tls = ad.tls and (s.tls_ca is not None or s.tls_cert is not None)
        channel = open_channel(
            ad.address,
            max_message_bytes=1 << 16,
            tls_ca=s.tls_ca if tls else None,
            tls_cert=s.tls_cert if tls else None,
            tls_key=s.tls_key if tls else None,
        )
        async with channel:
            return await check_health(channel, timeout=_HEALTH_TIMEOUT) == Health.SERVING


class NodeDiscovery:
    """A node's mDNS: its advertisement (`_shoal-node._tcp`, re-announced when what `info`
    says changes) and, without a coordinator address, the finder of its coordinator.

    Nothing is opened when the node neither advertises nor looks for its coordinator.
    `async_start`, then `async_stop` (idempotent).
    """

    def __init__(
        self,
        settings: NodeSettings,
        info: Callable[[], node_pb2.NodeInfo],
        *,
        refresh_every: timedelta = timedelta(seconds=_REFRESH_EVERY),
    ) -> None:
        self._settings = settings
        self._info = info
        self._refresh_every = refresh_every.total_seconds()
        self._zc: AsyncZeroconf | None = None
        self._finder: CoordinatorFinder | None = None
        self._advertisement: Advertisement | None = None
        self._refresh: asyncio.Task[None] | None = None
        self._hosts: list[str] = []
        self._port = 0

    @property
    def advertisement(self) -> Advertisement | None:
        return self._advertisement

    async def async_start(self, port: int) -> None:
        """Advertise the node's service on `port` (by the `advertise` rule) and, without a
        coordinator address, start looking for it."""
        s = self._settings
        advertise = advertises(s.advertise, s.listen)
        look = not s.coordinator and not s.standalone
        if not advertise and not look:
            return
        try:
            self._zc = zc = open_zeroconf(s.listen)
        except (OSError, RuntimeError) as err:
            if look:
                raise  # no way to find the coordinator
            _log.error("cannot advertise on mDNS (%s); the node runs unadvertised", err)
            return
        if look:
            self._finder = CoordinatorFinder(zc, s)
            self._finder.async_start()
        if advertise:
            self._hosts = await advertised_hosts(s.listen)
            self._port = port
            ad = self._ad()
            self._advertisement = Advertisement(
                zc, NODE_SERVICE, ad.node_id, hosts=self._hosts, port=port, txt=ad.txt()
            )
            self._advertisement.async_publish()
            self._refresh = asyncio.create_task(self._follow_capabilities(), name="shoal-mdns")

    async def async_coordinator(self) -> str:
        """host:port of the coordinator: the given one, else the one advertised for the
        node's cluster (waits until there is one)."""
        if self._finder is None:
            return self._settings.coordinator
        return (await self._finder.async_find()).address

    async def async_refresh(self) -> None:
        """Re-announce the advertisement if the node's capabilities changed."""
        if self._advertisement is not None:
            await self._advertisement.async_update(self._ad().txt())

    async def async_stop(self) -> None:
        """Withdraw the advertisement (peers drop the node at once), stop looking, close."""
        refresh, self._refresh = self._refresh, None
        if refresh is not None:
            refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresh
        finder, self._finder = self._finder, None
        if finder is not None:
            await finder.async_close()
        advertisement, self._advertisement = self._advertisement, None
        if advertisement is not None:
            await advertisement.async_withdraw()
        zc, self._zc = self._zc, None
        if zc is not None:
            await zc.async_close()

    def _ad(self) -> NodeAd:
        s = self._settings
        return node_ad(
            self._info(), cluster=s.cluster, hosts=self._hosts, port=self._port, tls=s.service_tls
        )

    async def _follow_capabilities(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_every)
            await self.async_refresh()
