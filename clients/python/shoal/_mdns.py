"""mDNS over python-zeroconf's asyncio API: advertising one service, browsing one service type."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import re
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from zeroconf import (
    BadTypeInNameException,
    InterfaceChoice,
    IPVersion,
    NonUniqueNameException,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from shoal.discovery import CoordinatorAd, NodeAd, instance_label, is_loopback, is_wildcard

__all__ = ["Advertisement", "Browser", "decode_coordinator", "decode_node", "open_zeroconf"]

_log = logging.getLogger("shoal.discovery")
_T = TypeVar("_T")

RESOLVE_TIMEOUT = 3.0
"""Seconds to wait for a service's SRV, TXT and address records once it is announced."""


def open_zeroconf(listen: str) -> AsyncZeroconf:
    """An mDNS responder and browser for a process whose server listens on `listen`.

    Bound to that address's interface when it names one (a coordinator on one network speaks
    mDNS on that network only), else to every interface. Call on the event loop.
    """
    host = listen.rsplit(":", 1)[0].strip("[]")
    if not is_wildcard(listen) and not is_loopback(listen):
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(host).version == 4:
                return AsyncZeroconf(interfaces=[host], ip_version=IPVersion.V4Only)
    return AsyncZeroconf(interfaces=InterfaceChoice.All, ip_version=IPVersion.V4Only)


def decode_coordinator(info: AsyncServiceInfo) -> CoordinatorAd | None:
    """A resolved `_shoal._tcp` service; None without an address to dial."""
    hosts = info.parsed_addresses(IPVersion.V4Only) + info.parsed_addresses(IPVersion.V6Only)
    if not hosts or not info.port:
        return None
    return CoordinatorAd.from_txt(info.name, hosts, info.port, info.decoded_properties)


def decode_node(info: AsyncServiceInfo) -> NodeAd | None:
    """A resolved `_shoal-node._tcp` service; None without an address to dial."""
    hosts = info.parsed_addresses(IPVersion.V4Only) + info.parsed_addresses(IPVersion.V6Only)
    if not hosts or not info.port:
        return None
    return NodeAd.from_txt(info.name, hosts, info.port, info.decoded_properties)


def _host_label(text: str) -> str:
    """`text` as letters, digits and dashes (a host name label), at most 40 of them."""
    return re.sub(r"[^A-Za-z0-9-]+", "-", text).strip("-")[:40] or "shoal"


def _server_name(label: str, service_type: str, hosts: Sequence[str], port: int) -> str:
    """The host name of a service at `hosts`:`port`, unique to those addresses."""
    digest = hashlib.sha256(f"{','.join(hosts)}|{port}".encode()).hexdigest()[:8]
    kind = service_type.split(".", 1)[0].strip("_")
    return f"{_host_label(label)[:31]}-{digest}-{kind}.local."


class Advertisement:
    """One service advertised from `async_publish` until `async_withdraw`.

    Probing for the name takes about a second, so `async_publish` returns at once and the
    announcement goes out in the background; a name already taken gets a `-2` suffix.
    """

    def __init__(
        self,
        zc: AsyncZeroconf,
        service_type: str,
        instance: str,
        *,
        hosts: Sequence[str],
        port: int,
        txt: dict[str, str],
    ) -> None:
        label = instance_label(instance)
        self._zc = zc
        self._info = AsyncServiceInfo(
            service_type,
            f"{label}.{service_type}",
            port=port,
            properties=dict(txt),
            # A host name of its own: two services on one machine (or in two network
            # namespaces of one machine, which share its host name) never mix addresses,
            # even when their instance names collide (the second is renamed, not its host).
            server=_server_name(label, service_type, hosts, port),
            parsed_addresses=list(hosts),
        )
        self._txt = dict(txt)
        self._registered = False
        self._publishing: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        """The instance name as registered (it may have been renamed to be unique)."""
        return str(self._info.name)

    @property
    def registered(self) -> bool:
        return self._registered

    def async_publish(self) -> None:
        """Start probing for the name, then announce; returns at once."""
        if self._publishing is None:
            self._publishing = asyncio.create_task(self._publish(), name="shoal-mdns-publish")

    async def async_published(self) -> None:
        """Wait until probing is over and the service answers queries."""
        if self._publishing is not None:
            await asyncio.shield(self._publishing)

    async def _publish(self) -> None:
        try:
            announced = await self._zc.async_register_service(self._info, allow_name_change=True)
        except (NonUniqueNameException, BadTypeInNameException, OSError) as err:
            _log.error("cannot advertise %s: %s", self._info.name, err)
            return
        self._registered = True
        _log.info("advertising %s on %s", self.name, self._hosts())
        await announced

    async def async_update(self, txt: dict[str, str]) -> None:
        """Announce a new TXT record, when it differs from the current one."""
        if txt == self._txt:
            return
        self._txt = dict(txt)
        if self._publishing is not None and not self._publishing.done():
            await asyncio.shield(self._publishing)  # still probing: the name may change
        info = AsyncServiceInfo(
            self._info.type,
            self._info.name,
            port=self._info.port,
            properties=dict(txt),
            server=self._info.server,
            parsed_addresses=self._info.parsed_addresses(),
        )
        self._info = info
        if self._registered:
            await (await self._zc.async_update_service(info))
            _log.info("advertisement of %s updated", self.name)

    async def async_withdraw(self) -> None:
        """Say goodbye (peers drop the service at once); idempotent."""
        publishing, self._publishing = self._publishing, None
        if publishing is not None and not publishing.done():
            publishing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publishing
        if self._registered:
            self._registered = False
            await (await self._zc.async_unregister_service(self._info))
            _log.info("withdrew %s", self.name)

    def _hosts(self) -> str:
        return ",".join(self._info.parsed_addresses()) + f" port {self._info.port}"


class Browser(Generic[_T]):
    """What is advertised of one service type now, decoded by `decode`, by instance name.

    Each service is resolved (SRV, TXT, addresses) when it appears or changes, and dropped
    when it says goodbye or its records expire; `async_changed` wakes on each change.
    """

    def __init__(
        self,
        zc: AsyncZeroconf,
        service_type: str,
        decode: Callable[[AsyncServiceInfo], _T | None],
    ) -> None:
        self._zc = zc
        self._type = service_type
        self._decode = decode
        self._present: dict[str, int] = {}  # names announced now -> generation
        self._generation = 0
        self._seen: dict[str, _T] = {}
        self._resolving: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self._version = 0
        self._browser: AsyncServiceBrowser | None = None

    @property
    def seen(self) -> dict[str, _T]:
        """Resolved services, by instance name (a copy)."""
        return dict(self._seen)

    def async_start(self) -> None:
        """Start browsing (queries go out at once, then less and less often)."""
        if self._browser is None:
            self._browser = AsyncServiceBrowser(
                self._zc.zeroconf, [self._type], handlers=[self._on_change]
            )

    @property
    def version(self) -> int:
        """A number that grows with each change of `seen`."""
        return self._version

    async def async_changed(self, timeout: float, *, since: int | None = None) -> bool:
        """Wait up to `timeout` seconds for a change (after `version` was `since`, when given);
        whether there was one."""
        if since is not None and since != self._version:
            return True
        changed = self._changed
        try:
            async with asyncio.timeout(timeout):
                await changed.wait()
        except TimeoutError:
            return False
        return True

    async def async_close(self) -> None:
        browser, self._browser = self._browser, None
        if browser is not None:
            await browser.async_cancel()
        for task in list(self._resolving):
            task.cancel()
        await asyncio.gather(*self._resolving, return_exceptions=True)

    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            self._present.pop(name, None)
            if self._seen.pop(name, None) is not None:
                self._notify()
            return
        self._generation += 1
        self._present[name] = self._generation
        task = asyncio.create_task(self._resolve(name, self._generation))
        self._resolving.add(task)
        task.add_done_callback(self._resolving.discard)

    async def _resolve(self, name: str, generation: int) -> None:
        info = AsyncServiceInfo(self._type, name)
        if not await info.async_request(self._zc.zeroconf, RESOLVE_TIMEOUT * 1000):
            _log.debug("cannot resolve %s", name)
            return
        if self._present.get(name) != generation:
            return  # gone, or changed again meanwhile: that resolution wins
        try:
            decoded = self._decode(info)
        except (ValueError, UnicodeError) as err:
            _log.warning("ignoring %s: %s", name, err)
            decoded = None
        if decoded is None:
            return
        if self._seen.get(name) != decoded:
            self._seen[name] = decoded
            self._notify()

    def _notify(self) -> None:
        self._version += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
