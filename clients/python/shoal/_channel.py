"""Dialling a Shoal server: one channel factory for the SDK, the CLI and nodes."""

from __future__ import annotations

from pathlib import Path

import grpc

from shoal._server import grpc_options
from shoal.auth import check_token

__all__ = ["CLIENT_KEY", "Metadata", "bearer", "open_channel"]

Metadata = tuple[tuple[str, str], ...]


def open_channel(
    target: str,
    *,
    max_message_bytes: int,
    tls_ca: Path | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> grpc.aio.Channel:
    """A plaintext channel, or TLS when a CA or a client certificate is given (mTLS with both)."""
    options = grpc_options(max_message_bytes)
    if tls_ca is None and tls_cert is None:
        return grpc.aio.insecure_channel(target, options=options)
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("a client certificate needs its key, and a key its certificate")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls_ca.read_bytes() if tls_ca else None,
        private_key=tls_key.read_bytes() if tls_key else None,
        certificate_chain=tls_cert.read_bytes() if tls_cert else None,
    )
    return grpc.aio.secure_channel(target, credentials, options=options)


CLIENT_KEY = "shoal-client"
"""Call metadata naming one client (an SDK instance): its place in line while admission waits."""


def bearer(token: str) -> Metadata:
    """Call metadata carrying `token` (none when empty); Unauthenticated when it holds what no
    token does."""
    return (("authorization", f"Bearer {check_token(token)}"),) if token else ()
