"""Who calls over HTTP: a bearer token, or a cookie session opened with one; CSRF checks.

A session maps a random id (the `shoal_session` cookie) to the token it was opened with, held
in this process only: the cookie carries no token, and every call authenticates the token
again, so a revoked or expired token ends its sessions at once. Sessions are bounded per token
(its own oldest goes first: no login ends another token's session) and expire; logins are
rate-limited per address and per token.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta

from aiohttp import web

from shoal._gate import authorize
from shoal.auth import ANONYMOUS, Principal, Role, check_token
from shoal.coordinator.http.limits import LoginLimit
from shoal.errors import PermissionDenied, Unauthenticated, Unavailable

__all__ = ["CSRF_COOKIE", "CSRF_HEADER", "SESSION_COOKIE", "Caller", "Session", "Sessions"]

SESSION_COOKIE = "shoal_session"
CSRF_COOKIE = "shoal_csrf"
CSRF_HEADER = "X-CSRF-Token"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_MAX_ID = 128  # longer cookie values are no session of ours


@dataclass(frozen=True)
class Session:
    id: str
    token: str
    csrf: str
    expires_at: float  # monotonic
    owner: str  # the id of the token it was opened with


class Sessions:
    """At most `per_owner` sessions per token (a new one beyond it ends that token's oldest,
    never another token's), each for `ttl` after it was opened."""

    def __init__(
        self,
        *,
        per_owner: int = 16,
        ttl: timedelta = timedelta(hours=12),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._per_owner = per_owner
        self.ttl = ttl
        self._clock = clock
        self._by_id: OrderedDict[str, Session] = OrderedDict()  # in the order opened
        self._by_owner: dict[str, list[str]] = {}  # ids, in the order opened

    def __len__(self) -> int:
        return len(self._by_id)

    def open(self, token: str, owner: str) -> Session:
        """A new session for `token`, whose id is `owner`."""
        self._expire()
        while len(self._by_owner.get(owner, ())) >= self._per_owner:
            self.close(self._by_owner[owner][0])
        session = Session(
            id=secrets.token_urlsafe(32),
            token=token,
            csrf=secrets.token_urlsafe(32),
            expires_at=self._clock() + self.ttl.total_seconds(),
            owner=owner,
        )
        self._by_id[session.id] = session
        self._by_owner.setdefault(owner, []).append(session.id)
        return session

    def get(self, session_id: str) -> Session | None:
        if len(session_id) > _MAX_ID:
            return None
        session = self._by_id.get(session_id)
        if session is not None and session.expires_at <= self._clock():
            self.close(session_id)
            return None
        return session

    def close(self, session_id: str) -> None:
        session = self._by_id.pop(session_id, None)
        if session is None:
            return
        ids = self._by_owner[session.owner]
        ids.remove(session_id)
        if not ids:
            del self._by_owner[session.owner]

    def _expire(self) -> None:
        now = self._clock()
        while self._by_id:
            oldest = next(iter(self._by_id.values()))
            if oldest.expires_at > now:  # opened in order, with one ttl: the rest are younger
                break
            self.close(oldest.id)


class Caller:
    """Decides who makes an HTTP request and whether it may call a method, through the same
    `authorize` (policy, tokens, roles) the gRPC Gate uses."""

    def __init__(
        self,
        policy: Mapping[str, frozenset[Role]],
        authenticate: Callable[[str], Principal] | None,
        sessions: Sessions,
        standby: Callable[[], str | None] | None = None,
        *,
        logins: LoginLimit | None = None,
    ) -> None:
        self._policy = policy
        self._authenticate = authenticate
        self.sessions = sessions
        self._standby = standby
        self._logins = logins or LoginLimit()

    @property
    def auth(self) -> bool:
        return self._authenticate is not None

    def for_method(self, request: web.Request, method: str) -> Principal | None:
        """The principal calling `method` (None: an open method); raises Unauthenticated or
        PermissionDenied as gRPC would, and PermissionDenied for a cookie call without its
        CSRF token."""
        return authorize(
            self._policy,
            self._authenticate,
            method,
            lambda: self.token(request),
            standby=self._standby,
        )

    def check_leading(self) -> None:
        """Unavailable, naming the leader, while this coordinator stands by (its tokens are
        not loaded: no caller can be told who they are)."""
        leader = self._standby() if self._standby is not None else None
        if leader is not None:
            raise Unavailable(f"this coordinator stands by: {leader}")

    def whoami(self, request: web.Request) -> Principal:
        """Who sends `request` (any valid token or session)."""
        self.check_leading()
        if self._authenticate is None:
            return ANONYMOUS
        token = self.token(request)
        if not token:
            raise Unauthenticated("no credentials: send `Authorization: Bearer <token>` or log in")
        return self._authenticate(token)

    def login(self, token: str, address: str) -> tuple[Principal, Session | None]:
        """Check `token` and open a session for it (None when auth is off); ResourceExhausted
        when `address`, or the token, logs in too often."""
        self.check_leading()
        if self._authenticate is None:
            return ANONYMOUS, None
        self._logins.take(("address", address), f"from {address}")
        principal = self._authenticate(check_token(token))
        self._logins.take(("token", principal.token_id), f"as {principal.name}")
        return principal, self.sessions.open(token, principal.token_id)

    def token(self, request: web.Request) -> str:
        """The token of `request`: its bearer token, else its session's; '' when it has none."""
        header = request.headers.get("Authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("the Authorization header must be `Bearer <token>`")
            return check_token(token.strip())
        session_id = request.cookies.get(SESSION_COOKIE)
        if session_id is None:
            return ""
        session = self.sessions.get(session_id)
        if session is None:
            raise Unauthenticated("the session has expired or was closed: log in again")
        check_csrf(request, session)
        return session.token


def check_csrf(request: web.Request, session: Session) -> None:
    """A request that changes something and is authenticated by cookie must carry the
    session's CSRF token in a header, which another site's page cannot set."""
    if request.method in _SAFE_METHODS:
        return
    sent = request.headers.get(CSRF_HEADER, "")
    if not sent or not hmac.compare_digest(sent.encode(), session.csrf.encode()):
        raise PermissionDenied(
            f"a call authenticated by cookie needs the header {CSRF_HEADER} holding the"
            f" {CSRF_COOKIE} cookie's value"
        )
