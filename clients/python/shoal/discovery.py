"""What coordinators and nodes tell the LAN about themselves by mDNS (DNS-SD), and how to read it.

Coordinators advertise `_shoal._tcp.local.`, nodes `_shoal-node._tcp.local.`; each TXT record
carries capabilities (never a secret). Pure: no sockets here (see `shoal._mdns`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import unquote

import psutil

from shoal import __version__
from shoal.errors import FailedPrecondition

__all__ = [
    "COORDINATOR_SERVICE",
    "NODE_SERVICE",
    "TXT_VERSION",
    "Advertise",
    "AmbiguousCoordinator",
    "CoordinatorAd",
    "NodeAd",
    "advertised_hosts",
    "advertises",
    "choose_coordinator",
    "instance_label",
    "is_loopback",
    "is_wildcard",
]

_log = logging.getLogger("shoal.discovery")

COORDINATOR_SERVICE = "_shoal._tcp.local."
NODE_SERVICE = "_shoal-node._tcp.local."
TXT_VERSION = "1"
"""`txtvers` of the TXT records below; readers ignore keys they do not know."""

Advertise = Literal["auto", "on", "off"]
"""auto: advertise unless the server listens on loopback only; on: always; off: never."""

_MAX_TXT_ENTRY = 255  # bytes of one `key=value` string (RFC 6763 §6.1)
_MAX_LABEL = 63  # bytes of one DNS label: an instance name
_ESCAPES = {"%": "%25", ",": "%2C", "=": "%3D"}
_TRUE = frozenset({"true", "1", "yes", "on"})


def is_loopback(address: str) -> bool:
    """Whether a `host:port` listen address binds loopback only."""
    host = _host(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_wildcard(address: str) -> bool:
    """Whether a `host:port` listen address binds every interface (0.0.0.0, [::], or no host)."""
    return _host(address) in ("", "0.0.0.0", "::")


def advertises(mode: Advertise, listen: str) -> bool:
    """Whether a server listening on `listen` advertises itself, under `mode`."""
    if mode == "auto":
        return not is_loopback(listen)
    return mode == "on"


async def advertised_hosts(listen: str) -> list[str]:
    """The IP addresses to advertise for a server bound to `listen` (IPv4 first).

    A wildcard stands for every non-loopback IPv4 address of the machine (in a network
    namespace: of the namespace); a host name, for what it resolves to.
    """
    host = _host(listen)
    if is_wildcard(listen):
        return sorted(
            {
                a.address
                for addrs in psutil.net_if_addrs().values()
                for a in addrs
                if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback
            },
            key=ipaddress.IPv4Address,
        )
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    found = {str(info[4][0]) for info in infos}
    return sorted(found, key=lambda a: (ipaddress.ip_address(a).version, a))


def instance_label(text: str) -> str:
    """`text` cut to one DNS label (63 bytes, whole characters; dots become dashes)."""
    label = text.replace(".", "-").strip() or "shoal"
    while len(label.encode()) > _MAX_LABEL:
        label = label[:-1]
    return label


def _host(address: str) -> str:
    return address.rsplit(":", 1)[0].strip("[]") if ":" in address else address


def _escape(text: str) -> str:
    return "".join(_ESCAPES.get(c, c) for c in text)


def _encode_list(key: str, items: Iterable[str], truncated: list[str]) -> str:
    """`a,b,c` with `,`, `=` and `%` escaped; items that would overflow the entry are left out."""
    out = ""
    for item in items:
        joined = f"{out},{item}" if out else item
        if len(f"{key}={joined}".encode()) > _MAX_TXT_ENTRY:
            truncated.append(key)
            break
        out = joined
    return out


def _decode_list(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    return tuple(unquote(item) for item in text.split(","))


def _decode_labels(text: str | None) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in (text or "").split(","):
        key, sep, value = item.partition("=")
        if sep and key:
            labels[unquote(key)] = unquote(value)
    return labels


def _flag(text: str | None) -> bool:
    return (text or "").strip().lower() in _TRUE


def _fit(key: str, value: str, truncated: list[str]) -> str:
    """`value` cut (whole characters) so that `key=value` fits one TXT entry."""
    cut = value
    while len(f"{key}={cut}".encode()) > _MAX_TXT_ENTRY:
        cut = cut[:-1]
    if cut != value:
        truncated.append(key)
    return cut


def _join_host(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class CoordinatorAd:
    """A coordinator as advertised: where it listens and what a node needs to know to join."""

    name: str  # the mDNS instance name
    hosts: tuple[str, ...]
    port: int
    cluster: str = "default"
    version: str = __version__
    tls: bool = False
    auth: bool = True

    @property
    def address(self) -> str:
        """`host:port` to dial (the first advertised address)."""
        return _join_host(self.hosts[0], self.port) if self.hosts else ""

    def txt(self) -> dict[str, str]:
        """The TXT record: no secret, only what a node needs to choose and dial it."""
        truncated: list[str] = []
        return {
            "txtvers": TXT_VERSION,
            "cluster": _fit("cluster", self.cluster, truncated),
            "version": _fit("version", self.version, truncated),
            "tls": "true" if self.tls else "false",
            "auth": "true" if self.auth else "false",
        }

    @classmethod
    def from_txt(
        cls, name: str, hosts: Sequence[str], port: int, txt: Mapping[str, str | None]
    ) -> CoordinatorAd:
        return cls(
            name=name,
            hosts=tuple(hosts),
            port=port,
            cluster=txt.get("cluster") or "default",
            version=txt.get("version") or "",
            tls=_flag(txt.get("tls")),
            auth=_flag(txt.get("auth")),
        )


@dataclass(frozen=True)
class NodeAd:
    """A node as advertised: its service's address and its capabilities."""

    name: str  # the mDNS instance name
    hosts: tuple[str, ...]
    port: int
    node_id: str
    cluster: str = "default"
    version: str = __version__
    executors: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    models: tuple[str, ...] = ()
    truncated: tuple[str, ...] = ()  # TXT keys whose lists did not fit in full
    tls: bool = False  # its service speaks TLS

    @property
    def address(self) -> str:
        """`host:port` of the node's own service (health, Info)."""
        return _join_host(self.hosts[0], self.port) if self.hosts else ""

    def txt(self) -> dict[str, str]:
        """The TXT record; a list too long for one entry keeps its first items and is named
        in `truncated` (the node's Info has it all)."""
        truncated: list[str] = []
        txt = {
            "txtvers": TXT_VERSION,
            "id": _fit("id", self.node_id, truncated),
            "cluster": _fit("cluster", self.cluster, truncated),
            "version": _fit("version", self.version, truncated),
            "executors": _encode_list("executors", map(_escape, self.executors), truncated),
            "labels": _encode_list(
                "labels",
                (f"{_escape(k)}={_escape(v)}" for k, v in sorted(self.labels.items())),
                truncated,
            ),
            "models": _encode_list("models", map(_escape, self.models), truncated),
            "tls": "true" if self.tls else "false",
        }
        if truncated:
            txt["truncated"] = ",".join(truncated)
        return txt

    @classmethod
    def from_txt(
        cls, name: str, hosts: Sequence[str], port: int, txt: Mapping[str, str | None]
    ) -> NodeAd:
        return cls(
            name=name,
            hosts=tuple(hosts),
            port=port,
            node_id=txt.get("id") or name.split(".", 1)[0],
            cluster=txt.get("cluster") or "default",
            version=txt.get("version") or "",
            executors=_decode_list(txt.get("executors")),
            labels=_decode_labels(txt.get("labels")),
            models=_decode_list(txt.get("models")),
            truncated=_decode_list(txt.get("truncated")),
            tls=_flag(txt.get("tls")),
        )


class AmbiguousCoordinator(FailedPrecondition):
    """Several coordinators advertise the cluster a node is to join."""

    def __init__(self, cluster: str, candidates: Sequence[CoordinatorAd]) -> None:
        listed = ", ".join(f"{c.name} at {c.address}" for c in candidates)
        super().__init__(
            f"{len(candidates)} coordinators advertise cluster {cluster!r}: {listed}. Give the"
            " node --coordinator HOST:PORT, or give the coordinators different --cluster names."
        )
        self.candidates = tuple(candidates)


def choose_coordinator(seen: Iterable[CoordinatorAd], cluster: str) -> CoordinatorAd | None:
    """The one coordinator advertising `cluster`; None when none does.

    Raises AmbiguousCoordinator when several do.
    """
    candidates = sorted((c for c in seen if c.cluster == cluster), key=lambda c: c.name)
    if len(candidates) > 1:
        raise AmbiguousCoordinator(cluster, candidates)
    return candidates[0] if candidates else None
