"""Who is calling: roles, principals and API tokens. No gRPC here.

A token reads `shoal_<id>_<secret>`. Servers keep only the id and a SHA-256 of the secret
(the secret is 256 random bits, so a fast hash is safe), and compare in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from shoal.errors import PermissionDenied, Unauthenticated

__all__ = [
    "ANONYMOUS",
    "COORDINATOR",
    "Principal",
    "Role",
    "check_token",
    "hash_secret",
    "new_token",
    "node_id_matches",
    "parse_token",
    "secret_matches",
]

_PREFIX = "shoal"


class Role(StrEnum):
    ADMIN = "admin"
    SUBMITTER = "submitter"
    READER = "reader"
    NODE = "node"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. `tenant` empty: every tenant; `cert_name`: its mTLS identity."""

    name: str
    role: Role
    tenant: str = ""
    node_id: str = ""
    executors: frozenset[str] = frozenset()  # a node may advertise only these (empty: any)
    labels: Mapping[str, str] = field(default_factory=dict)  # ... and only these labels
    token_id: str = ""
    cert_name: str = ""

    def may_be_node(self, node_id: str) -> bool:
        """Whether a node token lets its holder connect as `node_id` (see `node_id_matches`)."""
        return node_id_matches(self.node_id, node_id)

    def check_tenant(self, tenant: str, what: str) -> None:
        """Raise PermissionDenied unless this principal may act on `tenant`'s `what`."""
        if self.tenant and tenant != self.tenant:
            raise PermissionDenied(f"{self.name} has no access to {what}")

    def scoped_tenant(self, asked: str) -> str:
        """The tenant filter to apply when this principal asks for `asked` ('' = all)."""
        if not self.tenant:
            return asked
        if asked and asked != self.tenant:
            raise PermissionDenied(f"{self.name} has no access to tenant {asked!r}")
        return self.tenant


def node_id_matches(pattern: str, node_id: str) -> bool:
    """Whether a node token's node id `pattern` admits `node_id`: the same id, or, for a pool
    token (`PREFIX*`, shared by nodes such as a Deployment's pods), any longer id that begins
    with PREFIX."""
    if pattern.endswith("*"):
        prefix = pattern[:-1]
        return node_id.startswith(prefix) and len(node_id) > len(prefix)
    return node_id == pattern


ANONYMOUS = Principal("anonymous", Role.ADMIN)
"""The caller when authentication is off (loopback only)."""

COORDINATOR = "coordinator"
"""The principal of changes the coordinator makes by itself (a lease expired, a node left)."""


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def new_token() -> tuple[str, str, bytes]:
    """A fresh token: (id, the token to hand out, the hash to keep)."""
    token_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return token_id, f"{_PREFIX}_{token_id}_{secret}", hash_secret(secret)


def check_token(token: str) -> str:
    """`token` if it can be sent in call metadata; Unauthenticated naming the problem if not
    (a line break, say, from a token file holding more than the token)."""
    if not all("!" <= c <= "~" for c in token):
        raise Unauthenticated(
            "the token holds a line break, space or other character no token has"
            " (a token is one line: shoal_<id>_<secret>)"
        )
    return token


def parse_token(token: str) -> tuple[str, str]:
    """(id, secret) of a token; Unauthenticated when it is not one."""
    prefix, _, rest = token.partition("_")
    token_id, _, secret = rest.partition("_")
    if prefix != _PREFIX or not token_id or not secret:
        raise Unauthenticated("malformed token: expected shoal_<id>_<secret>")
    return token_id, secret


def secret_matches(secret: str, digest: bytes) -> bool:
    return hmac.compare_digest(hash_secret(secret), digest)
