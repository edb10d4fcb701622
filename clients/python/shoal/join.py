"""The join line: one `shoal://` URL that gives a new node its coordinator, token and CA pin."""

from __future__ import annotations

import hashlib
import re
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, urlsplit

from shoal.errors import FailedPrecondition, InvalidArgument, Unavailable

__all__ = ["JoinLine", "ca_fingerprint", "fetch_pinned_ca"]

_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")
_MAX_LINE = 4096  # a token and an address: anything longer is not a join line


def ca_fingerprint(pem: bytes) -> str:
    """`sha256:HEX` of the first certificate in `pem` (its DER bytes)."""
    try:
        der = ssl.PEM_cert_to_DER_cert(pem.decode("ascii", errors="replace"))
    except ValueError as err:
        raise InvalidArgument(f"not a PEM certificate: {err}") from None
    return "sha256:" + hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class JoinLine:
    """Where a node dials, the token it presents, and the CA it pins (TLS only)."""

    address: str
    token: str
    ca: str = ""  # "sha256:HEX" of the coordinator's CA certificate, or "" without TLS

    def url(self) -> str:
        """The `shoal://HOST:PORT?token=...[&ca=sha256:...]` form that `parse` reads."""
        query = f"token={quote(self.token, safe='')}"
        if self.ca:
            query += f"&ca={self.ca}"
        return f"shoal://{self.address}?{query}"

    @classmethod
    def parse(cls, text: str) -> JoinLine:
        """Read a join line; anything else raises InvalidArgument naming what is wrong."""
        if len(text) > _MAX_LINE:
            raise InvalidArgument(f"a join line is at most {_MAX_LINE} characters")
        try:
            parts = urlsplit(text.strip())
            port = parts.port
        except ValueError as err:
            raise InvalidArgument(f"not a join line: {err}") from None
        if parts.scheme != "shoal" or not parts.hostname or port is None:
            raise InvalidArgument("a join line is shoal://HOST:PORT?token=...")
        if parts.path not in ("", "/") or parts.fragment or parts.username or parts.password:
            raise InvalidArgument("a join line has only HOST:PORT and a query")
        try:
            query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            raise InvalidArgument("the join line's query is not NAME=VALUE&...") from None
        unknown = set(query) - {"token", "ca"}
        if unknown:
            raise InvalidArgument(f"unknown join line fields: {', '.join(sorted(unknown))}")
        if any(len(values) != 1 for values in query.values()):
            raise InvalidArgument("each join line field is given once")
        token = query.get("token", [""])[0]
        if not token:
            raise InvalidArgument("the join line has no token")
        ca = query.get("ca", [""])[0]
        if ca and not _FINGERPRINT.fullmatch(ca):
            raise InvalidArgument("ca is sha256: and 64 lowercase hex digits")
        return cls(address=parts.netloc, token=token, ca=ca)


def fetch_pinned_ca(address: str, pin: str, *, timeout: float = 10.0) -> bytes:
    """The PEM of the certificate with fingerprint `pin` in the TLS chain `address` sends.

    Nothing can verify this connection yet, and nothing needs to: the pin is what makes the
    certificate trusted, and nothing but a TLS handshake is sent on it. The coordinator sends
    its CA when its certificate file holds the chain (`shoal certs issue` writes it so).
    """
    try:
        parts = urlsplit(f"//{address}")
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host or port is None:
        raise InvalidArgument(f"not HOST:PORT: {address!r}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            chain = _unverified_chain(tls)
    except ssl.SSLError as err:
        raise Unavailable(f"{address} does not answer TLS to show its CA: {err.reason}") from None
    except OSError as err:
        raise Unavailable(f"cannot reach {address} to fetch its CA: {err}") from None
    for pem in chain:
        if ca_fingerprint(pem) == pin:
            return pem
    raise FailedPrecondition(
        f"{address} sends no certificate {pin} in its TLS chain: give the CA's file with "
        "--tls-ca, or have the coordinator's certificate file hold its chain"
    )


def _unverified_chain(tls: ssl.SSLSocket) -> list[bytes]:
    """The certificates the peer sent, leaf first, as PEM."""
    # Public from Python 3.13; the same method of the underlying SSL object before.
    chain = getattr(tls, "get_unverified_chain", None) or tls._sslobj.get_unverified_chain  # type: ignore[attr-defined]
    return [cert.public_bytes().encode("ascii") for cert in chain() or ()]
