"""Dialling a Shoal server: one channel factory for the SDK, the CLI and nodes."""

from __future__ import annotations

import ipaddress
import json
import socket
from pathlib import Path
from typing import Any

import grpc

from shoal._leader import LeaderChannel
from shoal._server import grpc_options
from shoal.auth import check_token

__all__ = ["CLIENT_KEY", "Metadata", "bearer", "open_blocking_channel", "open_channel"]

Metadata = tuple[tuple[str, str], ...]


def open_channel(
    target: str,
    *,
    max_message_bytes: int,
    tls_ca: Path | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> grpc.aio.Channel:
    """A plaintext channel, or TLS when a CA or a client certificate is given (mTLS with both).

    `target` may list several coordinators ("host:port,host:port"): calls then go to the one
    whose health is SERVING, the leader (standbys answer NOT_SERVING), and follow it when
    another takes over.
    """
    dialled, options, credentials = _dial(target, max_message_bytes, tls_ca, tls_cert, tls_key)
    if credentials is None:
        return grpc.aio.insecure_channel(dialled, options=options)
    if "," in target:
        # Each certificate names its own coordinator: a channel per address, each checked
        # against the name it was dialled by.
        return LeaderChannel(
            [item.strip() for item in target.split(",")],
            lambda address: grpc.aio.secure_channel(address, credentials, options=options),
        )
    return grpc.aio.secure_channel(dialled, credentials, options=options)


def open_blocking_channel(
    target: str,
    *,
    max_message_bytes: int,
    tls_ca: Path | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> grpc.Channel | None:
    """open_channel's blocking twin, its calls made in the calling thread; None for a list
    of coordinators over TLS, which only open_channel follows."""
    dialled, options, credentials = _dial(target, max_message_bytes, tls_ca, tls_cert, tls_key)
    if credentials is None:
        return grpc.insecure_channel(dialled, options=options)
    if "," in target:
        return None
    return grpc.secure_channel(dialled, credentials, options=options)


def _dial(
    target: str,
    max_message_bytes: int,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
) -> tuple[str, list[tuple[str, Any]], grpc.ChannelCredentials | None]:
    """The target, options and credentials (None: plaintext) of a channel to `target`."""
    options = grpc_options(max_message_bytes)
    if tls_ca is None and tls_cert is None:
        if "," in target:
            target = _addresses(target)
            options.append(("grpc.service_config", _FOLLOW_THE_LEADER))
        return target, options, None
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("a client certificate needs its key, and a key its certificate")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls_ca.read_bytes() if tls_ca else None,
        private_key=tls_key.read_bytes() if tls_key else None,
        certificate_chain=tls_cert.read_bytes() if tls_cert else None,
    )
    if "," in target:
        _addresses(target)  # every item is host:port
    return target, options, credentials


# gRPC's own client-side health checking: round_robin over the addresses that answer
# grpc.health.v1.Health/Watch with SERVING, which only the leader does.
_FOLLOW_THE_LEADER = json.dumps(
    {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": ""}}
)


def _addresses(target: str) -> str:
    """host:port,host:port as a gRPC target of those addresses (names resolved here, once)."""
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    ports: list[int] = []
    for item in target.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"not host:port: {item.strip()!r} (in {target!r})")
        host = host.strip("[]")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = ipaddress.ip_address(
                socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]
            )
        found.append(ip)
        ports.append(int(port))
    if len({ip.version for ip in found}) > 1:
        raise ValueError(f"list coordinators all by IPv4 or all by IPv6, not both: {target!r}")
    if found[0].version == 4:
        return "ipv4:" + ",".join(f"{ip}:{port}" for ip, port in zip(found, ports, strict=True))
    return "ipv6:" + ",".join(f"[{ip}]:{port}" for ip, port in zip(found, ports, strict=True))


CLIENT_KEY = "shoal-client"
"""Call metadata naming one client (an SDK instance): its place in line while admission waits."""


def bearer(token: str) -> Metadata:
    """Call metadata carrying `token` (none when empty); Unauthenticated when it holds what no
    token does."""
    return (("authorization", f"Bearer {check_token(token)}"),) if token else ()
