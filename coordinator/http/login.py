"""POST /api/login, POST /api/logout, GET /api/whoami: a browser's cookie session."""

from __future__ import annotations

from aiohttp import web

from shoal.auth import Principal
from shoal.coordinator.http.auth import CSRF_COOKIE, SESSION_COOKIE, Caller, check_csrf
from shoal.coordinator.http.body import read_json
from shoal.coordinator.http.errors import error_response, unexpected_response
from shoal.coordinator.http.rpc import API_PREFIX, json_response
from shoal.errors import InvalidArgument, ShoalError

__all__ = ["login_routes"]


def _who(principal: Principal) -> dict[str, str]:
    return {
        "name": principal.name,
        "role": str(principal.role),
        "tenant": principal.tenant,
        "token_id": principal.token_id,
    }


def login_routes(caller: Caller, *, secure: bool) -> list[web.RouteDef]:
    """The session routes; `secure`: cookies only over TLS."""

    async def login(request: web.Request) -> web.StreamResponse:
        try:
            body = await read_json(request)
            token = body.get("token") if isinstance(body, dict) else None
            if not isinstance(token, str) or not token:
                raise InvalidArgument('the body must be {"token": "<token>"}')
            principal, session = caller.login(token, request.remote or "unknown")
        except ShoalError as err:
            return error_response(err, "login")
        except Exception:
            return unexpected_response("login")
        response = json_response(_who(principal))
        if session is not None:
            max_age = int(caller.sessions.ttl.total_seconds())
            response.set_cookie(
                SESSION_COOKIE,
                session.id,
                max_age=max_age,
                path="/",
                httponly=True,
                samesite="Strict",
                secure=secure,
            )
            # Read by the page, which sends it back as X-CSRF-Token; not secret from it.
            response.set_cookie(
                CSRF_COOKIE,
                session.csrf,
                max_age=max_age,
                path="/",
                samesite="Strict",
                secure=secure,
            )
        return response

    async def logout(request: web.Request) -> web.StreamResponse:
        session_id = request.cookies.get(SESSION_COOKIE)
        try:
            session = caller.sessions.get(session_id) if session_id else None
            if session is not None:
                check_csrf(request, session)
                caller.sessions.close(session.id)
        except ShoalError as err:
            return error_response(err, "logout")
        response = json_response({})
        response.del_cookie(SESSION_COOKIE, path="/")
        response.del_cookie(CSRF_COOKIE, path="/")
        return response

    async def whoami(request: web.Request) -> web.StreamResponse:
        try:
            return json_response(_who(caller.whoami(request)))
        except ShoalError as err:
            return error_response(err, "whoami")

    return [
        web.post(f"{API_PREFIX}/login", login),
        web.post(f"{API_PREFIX}/logout", logout),
        web.get(f"{API_PREFIX}/whoami", whoami),
    ]
