"""Which addresses http tasks may connect to, checked on the address actually connected to.

A name is resolved here and the connection goes to an address that passed the check, so a
name that resolves one way when checked and another when connecting (DNS rebinding) gets
nowhere. Every connection of a redirect chain is checked the same way.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable, Iterable

import httpcore
import httpx

from shoal.node.executors.base import TaskError

__all__ = ["AddressRefused", "CheckedBackend", "IPAddress", "checked_transport", "is_public"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MayConnect = Callable[[str, int, IPAddress], bool]
"""(host as the URL names it, port, an address it resolves to) -> whether to connect there."""


class AddressRefused(TaskError):
    """A host resolves only to addresses that tasks may not reach from this node: the task's
    failure, like a host outside the allowlist."""


def is_public(address: IPAddress) -> bool:
    """Whether `address` is a public unicast one: not loopback, link-local, private,
    multicast, unspecified or reserved (an IPv4 address mapped into IPv6 counts as itself)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


class CheckedBackend(httpcore.AsyncNetworkBackend):
    """Connects to an address of the host only where `may_connect` allows it."""

    def __init__(self, may_connect: MayConnect) -> None:
        self._may_connect = may_connect
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        found = await _resolve(host, port, timeout)
        allowed = [a for a in found if self._may_connect(host, port, a)]
        if not allowed:
            what = host if str(found[0]) == host else f"host {host} resolves to {found[0]}, which"
            raise AddressRefused(
                f"{what} is not a public address: only a host or address that"
                " http_allow_hosts names exactly (no wildcard) may be loopback or private"
            )
        failure: Exception | None = None
        for address in allowed:
            try:
                return await self._inner.connect_tcp(
                    str(address),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as err:
                failure = err
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise AddressRefused("http tasks do not connect to unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


async def _resolve(host: str, port: int, timeout: float | None) -> list[IPAddress]:
    """The addresses of `host` (itself, when it is one), in the resolver's order."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except TimeoutError as err:
        raise httpcore.ConnectTimeout(f"resolving {host} timed out") from err
    except OSError as err:  # socket.gaierror: no such name, no resolver
        raise httpcore.ConnectError(f"cannot resolve {host}: {err.strerror or err}") from err
    found: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        # An IPv6 scope ("fe80::1%eth0") is not part of the address that is checked.
        address = ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])
        if address not in found:
            found.append(address)
    if not found:
        raise httpcore.ConnectError(f"cannot resolve {host}: no address")
    return found


def checked_transport(may_connect: MayConnect) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose connections go only where `may_connect` allows."""
    transport = httpx.AsyncHTTPTransport(trust_env=False)
    # httpx makes its pool with the default network backend and offers no way to pass
    # another: the pool is made again, as httpx makes it but for the backend.
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=httpx.create_ssl_context(trust_env=False),
        max_connections=100,
        max_keepalive_connections=20,
        keepalive_expiry=5.0,
        network_backend=CheckedBackend(may_connect),
    )
    return transport
