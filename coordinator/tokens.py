"""API tokens: created, listed and revoked by admins, checked on every call. No gRPC here."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from shoal.auth import (
    COORDINATOR,
    Principal,
    Role,
    new_token,
    node_id_matches,
    parse_token,
    secret_matches,
)
from shoal.coordinator.store import Store, TokenRow
from shoal.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from shoal.handshake import Direction, coordinator_proof
from shoal.spec_checks import TENANT_MAX, is_tenant

__all__ = ["NewToken", "TokenRegistry"]

_NAME_MAX = 128
_VERIFIED_MAX = 10_000  # valid tokens remembered; only valid ones, so callers cannot grow it


@dataclass(frozen=True)
class NewToken:
    row: TokenRow
    token: str  # the only time the secret is seen


class TokenRegistry:
    """Every token, held in memory and written through to the store."""

    def __init__(self, store: Store, *, wall: Callable[[], float] = time.time) -> None:
        self._store = store
        self._wall = wall
        self._rows: dict[str, TokenRow] = {}
        # Tokens seen to be valid, with their principal: a client sends the same one on every
        # call. Whether each is revoked or expired is still checked every time.
        self._verified: dict[str, tuple[TokenRow, Principal]] = {}

    async def load(self) -> None:
        self._rows = {row.id: row for row in await self._store.tokens()}

    def authenticate(self, token: str) -> Principal:
        """The principal of a presented token; Unauthenticated when unknown, expired or revoked."""
        verified = self._verified.get(token)
        if verified is None:
            verified = self._verify(token)
        row, principal = verified
        if row.revoked_at is not None:
            raise Unauthenticated(f"token {row.name!r} was revoked")
        if row.expires_at is not None and row.expires_at <= self._wall():
            raise Unauthenticated(f"token {row.name!r} has expired")
        return principal

    def _verify(self, token: str) -> tuple[TokenRow, Principal]:
        token_id, secret = parse_token(token)
        row = self._rows.get(token_id)
        # Unknown ids cost a hash comparison too, so timing tells nothing about which ids exist.
        digest = row.secret_hash if row is not None else b"\0" * 32
        if not secret_matches(secret, digest) or row is None:
            raise Unauthenticated("invalid token")
        principal = Principal(
            name=row.name,
            role=Role(row.role),
            tenant=row.tenant,
            node_id=row.node_id,
            executors=frozenset(row.executors),
            labels=dict(row.labels),
            token_id=row.id,
        )
        if len(self._verified) >= _VERIFIED_MAX:
            self._verified.clear()
        self._verified[token] = (row, principal)
        return row, principal

    def prove(
        self, direction: Direction, *, token_id: str, node_id: str, address: str, nonce: bytes
    ) -> bytes:
        """Answer a node's challenge: proof that this coordinator issued its token.

        Only for a token that holds and is that node's own: a node token of that node id, or,
        when the node dialled (JOIN), an admin token, which a node on this machine may use.
        """
        if not 16 <= len(nonce) <= 64:
            raise InvalidArgument("a challenge's nonce is 16 to 64 bytes")
        if len(address) > 300 or len(node_id) > 300:
            raise InvalidArgument("a challenge's node id and address are at most 300 characters")
        row = self._rows.get(token_id)
        if row is None or row.revoked_at is not None:
            raise Unauthenticated("the node's token is not one of this coordinator's")
        # Callers are not authenticated yet: the answers name no token.
        if row.expires_at is not None and row.expires_at <= self._wall():
            raise Unauthenticated("the node's token has expired")
        role = Role(row.role)
        if role is Role.NODE:
            if not node_id_matches(row.node_id, node_id):
                raise PermissionDenied(f"the token is not node {node_id!r}'s own")
        elif not (role is Role.ADMIN and direction is Direction.JOIN):
            raise PermissionDenied("only a node's own token is proven to it")
        return coordinator_proof(
            row.secret_hash,
            direction,
            token_id=token_id,
            node_id=node_id,
            address=address,
            nonce=nonce,
        )

    def valid(self, principal: Principal) -> bool:
        """Whether the token a principal authenticated with still holds (not revoked or expired).

        Long-lived streams ask this again, so revoking a token also ends them.
        """
        if not principal.token_id:
            return True
        row = self._rows.get(principal.token_id)
        return (
            row is not None
            and row.revoked_at is None
            and (row.expires_at is None or row.expires_at > self._wall())
        )

    def active(self) -> list[TokenRow]:
        return [r for r in self._rows.values() if r.revoked_at is None]

    def all(self) -> list[TokenRow]:
        return list(self._rows.values())

    async def create(
        self,
        *,
        name: str,
        role: Role,
        created_by: str,
        tenant: str = "",
        node_id: str = "",
        executors: Sequence[str] = (),
        labels: Mapping[str, str] | None = None,
        ttl: timedelta | None = None,
    ) -> NewToken:
        """Make and store a token; its name must be free among tokens not revoked."""
        if not name or len(name) > _NAME_MAX or not name.isprintable():
            raise InvalidArgument(f"token name must be 1-{_NAME_MAX} printable characters")
        if any(r.name == name for r in self.active()):
            raise AlreadyExists(f"a token named {name!r} exists; revoke it first")
        if ttl is not None and ttl <= timedelta(0):
            raise InvalidArgument("ttl must be positive")
        if role is Role.NODE:
            node_id = node_id or name
            if "*" in node_id[:-1] or node_id == "*":
                raise InvalidArgument(
                    "a node id has no '*', but a pool token's may end in one: PREFIX*"
                )
        elif node_id or executors or labels:
            raise InvalidArgument("node_id, executors and labels apply to node tokens only")
        if role in (Role.ADMIN, Role.NODE) and tenant:
            raise InvalidArgument(f"a {role} token has no tenant")
        if tenant and not is_tenant(tenant):
            raise InvalidArgument(f"a tenant is printable, has no '/' and is at most {TENANT_MAX}")
        token_id, token, digest = new_token()
        now = self._wall()
        row = TokenRow(
            id=token_id,
            name=name,
            role=role.value,
            tenant=tenant,
            node_id=node_id,
            executors=sorted(executors),
            labels=dict(labels or {}),
            secret_hash=digest,
            created_at=now,
            expires_at=None if ttl is None else now + ttl.total_seconds(),
            revoked_at=None,
            created_by=created_by,
        )
        await self._store.put_token(row)
        self._rows[row.id] = row
        return NewToken(row, token)

    async def revoke(self, name_or_id: str) -> TokenRow:
        """Revoke the active token with this name or id."""
        row = self._rows.get(name_or_id)
        if row is None or row.revoked_at is not None:
            row = next((r for r in self.active() if r.name == name_or_id), None)
        if row is None:
            raise NotFound(f"no active token {name_or_id!r}")
        at = self._wall()
        await self._store.revoke_token(row.id, at)
        row.revoked_at = at
        return row

    async def bootstrap_admin(self, path: Path, name: str = "local-admin") -> bool:
        """Make sure `path` holds a working admin token named `name`, creating one if needed
        (mode 0600), and revoking an older one of that name (its file is gone).

        Returns True when a new token was written.
        """
        try:
            self.authenticate((await asyncio.to_thread(path.read_text)).strip())
            return False
        except (OSError, Unauthenticated):
            pass
        for row in self.active():
            if row.name == name:
                await self.revoke(row.id)  # its file is gone: nobody can use it
        made = await self.create(name=name, role=Role.ADMIN, created_by=COORDINATOR)
        await asyncio.to_thread(_write_private, path, made.token + "\n")
        return True


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
