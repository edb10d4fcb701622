"""Errors over HTTP: the gRPC status of a Shoal error as an HTTP status and one JSON shape.

The body is `{"code": "invalid_argument", "message": "...", "details": [...]}`, each detail a
google.rpc message in protobuf's JSON mapping (`@type` and its fields): the same status, cut
the same way, that a gRPC caller gets.
"""

from __future__ import annotations

import json
import logging

from aiohttp import web
from google.protobuf import any_pb2, json_format
from google.rpc import code_pb2, error_details_pb2

from shoal import errors
from shoal._status import log_level, status_of

__all__ = [
    "HTTP_STATUS",
    "BodyTooLarge",
    "UnsupportedMediaType",
    "error_body",
    "error_response",
    "unexpected_response",
]

_log = logging.getLogger("shoal.http")

# google.rpc.Code -> HTTP status, as Connect and grpc-gateway map them.
HTTP_STATUS: dict[int, int] = {
    code_pb2.CANCELLED: 499,
    code_pb2.UNKNOWN: 500,
    code_pb2.INVALID_ARGUMENT: 400,
    code_pb2.DEADLINE_EXCEEDED: 504,
    code_pb2.NOT_FOUND: 404,
    code_pb2.ALREADY_EXISTS: 409,
    code_pb2.PERMISSION_DENIED: 403,
    code_pb2.RESOURCE_EXHAUSTED: 429,
    code_pb2.FAILED_PRECONDITION: 400,
    code_pb2.ABORTED: 409,
    code_pb2.OUT_OF_RANGE: 400,
    code_pb2.UNIMPLEMENTED: 501,
    code_pb2.INTERNAL: 500,
    code_pb2.UNAVAILABLE: 503,
    code_pb2.DATA_LOSS: 500,
    code_pb2.UNAUTHENTICATED: 401,
}


class UnsupportedMediaType(errors.InvalidArgument):
    """The body is not declared as JSON: HTTP 415."""


class BodyTooLarge(errors.ResourceExhausted):
    """The body is over the server's cap: HTTP 413."""


def _http_status(err: errors.ShoalError, code: int) -> int:
    if isinstance(err, UnsupportedMediaType):
        return 415
    if isinstance(err, BodyTooLarge):
        return 413
    return HTTP_STATUS.get(code, 500)


def _detail(detail: any_pb2.Any) -> dict[str, object]:
    return json_format.MessageToDict(detail)


def error_body(err: errors.ShoalError) -> tuple[int, dict[str, object]]:
    """(HTTP status, JSON body) of `err`."""
    status = status_of(err)
    body: dict[str, object] = {
        "code": code_pb2.Code.Name(status.code).lower(),
        "message": status.message,
    }
    if status.details:
        body["details"] = [_detail(d) for d in status.details]
    return _http_status(err, status.code), body


def error_response(err: errors.ShoalError, what: str) -> web.Response:
    """The response to a call `what` that ended in `err`, logged as gRPC logs it: with the
    message as the caller gets it, cut (it may quote the request: a 3 MB name)."""
    status, body = error_body(err)
    _log.log(log_level(err), "http=%s error=%s: %s", what, type(err).__name__, body["message"])
    headers = {}
    retry = getattr(err, "retry_after", None)
    if retry is not None:
        headers["Retry-After"] = str(max(1, round(retry.total_seconds())))
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="shoal"'
    return web.Response(
        status=status,
        text=json.dumps(body) + "\n",
        content_type="application/json",
        headers=headers,
    )


def unexpected_response(what: str, error: BaseException | None = None) -> web.Response:
    """The response to a call that failed by a bug (logged with its traceback: `error`, or
    the one being handled)."""
    _log.error("http=%s unexpected error", what, exc_info=error or True)
    return error_response(errors.InternalError("internal error"), what)


# The detail types must be in the default pool for MessageToDict to name their fields.
_ = error_details_pb2
