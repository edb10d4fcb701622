"""Request bodies: JSON in protobuf's JSON mapping, checked before anything reads them."""

from __future__ import annotations

import json
from typing import TypeVar

from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import Message

from shoal.coordinator.http.errors import BodyTooLarge, UnsupportedMediaType
from shoal.errors import InvalidArgument

__all__ = ["read_json", "read_message"]

M = TypeVar("M", bound=Message)
_MAX_DEPTH = 64  # nesting of messages in a request; no Shoal request comes near


async def read_json(request: web.Request) -> object:
    """The JSON value of `request`'s body (None when it is empty); its content type must be
    application/json and its size within the app's client_max_size."""
    if request.body_exists and request.content_type != "application/json":
        raise UnsupportedMediaType(
            f"the body must be JSON (Content-Type: application/json), not"
            f" {request.content_type[:100]!r}"
        )
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge(
            f"the body is over {request.client_max_size} bytes, this server's cap"
        ) from None
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise InvalidArgument(f"the body is not JSON: {str(err)[:200]}") from None


async def read_message(request: web.Request, cls: type[M]) -> M:
    """`request`'s body as a `cls` (an empty body: the empty message); InvalidArgument
    naming the problem for anything protobuf's JSON mapping refuses, unknown fields
    included."""
    data = await read_json(request)
    message = cls()
    if data is None:
        return message
    if not isinstance(data, dict):
        raise InvalidArgument(f"the body must be a JSON object ({cls.DESCRIPTOR.full_name})")
    try:
        json_format.ParseDict(data, message, max_recursion_depth=_MAX_DEPTH)
    except (json_format.ParseError, ValueError, TypeError, RecursionError) as err:
        raise InvalidArgument(f"bad {cls.DESCRIPTOR.name}: {str(err)[:300]}") from None
    return message
