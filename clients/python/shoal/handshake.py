"""Before a node's token crosses the wire, the coordinator proves it is the one that issued it.

Only the coordinator that issued a token keeps the SHA-256 of its secret, so it can answer a
challenge (a fresh nonce) with an HMAC keyed by that hash. The proof also names the address the
connection was dialled at and the node: a peer that relays a challenge to the real coordinator
gets back a proof for another address (the coordinator's own, or the relay's when the
coordinator dialled it), which the other end refuses. So neither end can be impersonated by
forwarding messages, and the bearer token is sent only after the proof holds.

Two directions, each with its own label so a proof for one serves nothing in the other:
- ATTACH: a coordinator dialled a node (Node.Attach); the node checks that the address the
  coordinator dialled is its own.
- JOIN: a node found a coordinator on its own (mDNS, loopback) and dials it
  (NodeGateway.Identify before Connect); the coordinator checks the address is its own.
No gRPC here.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import socket
from collections.abc import Iterable
from enum import StrEnum

import psutil

__all__ = ["Direction", "OwnAddresses", "coordinator_proof", "split_address"]

_log = logging.getLogger("shoal")
_RESOLVE_TIMEOUT = 2.0  # seconds a host name in a proof may take to resolve


class Direction(StrEnum):
    ATTACH = "attach"  # the coordinator dialled the node
    JOIN = "join"  # the node dialled the coordinator


def coordinator_proof(
    secret_hash: bytes,
    direction: Direction,
    *,
    token_id: str,
    node_id: str,
    address: str,
    nonce: bytes,
) -> bytes:
    """HMAC-SHA256, keyed with the hash of the token's secret, of every field, each length-
    prefixed (no two different field lists encode alike)."""
    message = b"shoal-proof-v2"
    for part in (direction.encode(), token_id.encode(), node_id.encode(), address.encode(), nonce):
        message += len(part).to_bytes(4, "big") + part
    return hmac.new(secret_hash, message, hashlib.sha256).digest()


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of `host:port` or `[v6]:port`; ValueError when it is not one."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not host:port: {address!r}")
    host = host.removeprefix("[").removesuffix("]")
    if not host:
        raise ValueError(f"no host in {address!r}")
    return host, int(port)


def _machine_addresses() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    found.add(ipaddress.ip_address(a.address.split("%", 1)[0]))
                except ValueError:
                    continue
    return found


class OwnAddresses:
    """Whether a `host:port` names this server: its bound port on an address of this machine
    (a name counts when it resolves to one), or one of `also` (how peers reach it through NAT
    or a proxy, as configured)."""

    def __init__(self, port: int, also: Iterable[str] = ()) -> None:
        self.port = port
        self._also = frozenset(a.strip().lower() for a in also)

    async def async_contains(self, address: str) -> bool:
        if address.strip().lower() in self._also:
            return True
        try:
            host, port = split_address(address)
        except ValueError:
            return False
        if port != self.port:
            return False
        mine = await asyncio.to_thread(_machine_addresses)
        try:
            return ipaddress.ip_address(host) in mine
        except ValueError:
            pass
        if len(host) > 253:
            return False
        try:
            async with asyncio.timeout(_RESOLVE_TIMEOUT):
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, None, type=socket.SOCK_STREAM
                )
        except (OSError, TimeoutError, UnicodeError):
            return False
        resolved = {ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos}
        # Every address the name stands for must be this machine's: otherwise a connection to
        # it may have reached another.
        return bool(resolved) and resolved <= mine
