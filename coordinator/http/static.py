"""GET / and /assets/...: the dashboard's files, from the package's dashboard folder."""

from __future__ import annotations

import re
from pathlib import Path

from aiohttp import web

__all__ = ["DASHBOARD_DIR", "static_routes"]

DASHBOARD_DIR = Path(__file__).resolve().parent.parent / "dashboard"
# Names of files the dashboard ships: no dot-files, no `..`, nothing but plain segments.
_ASSET = re.compile(r"(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}/){0,8}[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")


def static_routes(root: Path = DASHBOARD_DIR) -> list[web.RouteDef]:
    async def index(request: web.Request) -> web.StreamResponse:
        return _file(root / "index.html")

    async def asset(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if not _ASSET.fullmatch(name) or ".." in name.split("/"):
            raise web.HTTPNotFound()
        return _file(root / "assets" / name)

    return [
        web.get("/", index),
        web.get("/index.html", index),
        web.get("/assets/{name:.+}", asset),
    ]


def _file(path: Path) -> web.StreamResponse:
    if not path.is_file():
        raise web.HTTPNotFound()
    # Content type from the name (aiohttp's table); the files change only with the package.
    return web.FileResponse(path, headers={"Cache-Control": "no-cache"})
