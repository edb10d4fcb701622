"""The one table between Shoal's errors and gRPC status codes, used by servers and the SDK."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, cast

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from shoal import errors

_log = logging.getLogger("shoal.rpc")

# error class -> (status code, log level). Order matters only for lookups by code.
_TABLE: dict[type[errors.ShoalError], tuple[grpc.StatusCode, int]] = {
    errors.InvalidArgument: (grpc.StatusCode.INVALID_ARGUMENT, logging.DEBUG),
    errors.NotFound: (grpc.StatusCode.NOT_FOUND, logging.DEBUG),
    errors.AlreadyExists: (grpc.StatusCode.ALREADY_EXISTS, logging.DEBUG),
    errors.FailedPrecondition: (grpc.StatusCode.FAILED_PRECONDITION, logging.DEBUG),
    errors.ResourceExhausted: (grpc.StatusCode.RESOURCE_EXHAUSTED, logging.INFO),
    errors.PermissionDenied: (grpc.StatusCode.PERMISSION_DENIED, logging.WARNING),
    errors.Unauthenticated: (grpc.StatusCode.UNAUTHENTICATED, logging.WARNING),
    errors.Unavailable: (grpc.StatusCode.UNAVAILABLE, logging.INFO),
    errors.InternalError: (grpc.StatusCode.INTERNAL, logging.ERROR),
}
_BY_CODE = {code: cls for cls, (code, _) in _TABLE.items()}
_DETAILS_KEY = "grpc-status-details-bin"
# A status rides in trailing metadata, which clients cap at 8 KB: what a request can make
# long (ids, names, cycle paths, one violation per field) is cut to stay well under, UTF-8
# bytes counted (the message goes percent-encoded, at most 3 characters a byte; the details
# base64-encoded).
_MAX_MESSAGE = 512
_MAX_ITEMS = 6
_MAX_FIELD = 64
_MAX_DESCRIPTION = 128


def _code_and_level(err: errors.ShoalError) -> tuple[grpc.StatusCode, int]:
    for cls in type(err).__mro__:
        if cls in _TABLE:
            return _TABLE[cls]
    return grpc.StatusCode.INTERNAL, logging.ERROR


def _cut(text: str, limit: int) -> str:
    """`text` within `limit` UTF-8 bytes, ending in "…" when cut."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode(errors="ignore") + "…"


def _bounded(items: list[errors.FieldViolation]) -> list[errors.FieldViolation]:
    """The first few of `items`, each cut, and "… and N more" for the rest."""
    out = [
        errors.FieldViolation(_cut(v.field, _MAX_FIELD), _cut(v.description, _MAX_DESCRIPTION))
        for v in items[:_MAX_ITEMS]
    ]
    if len(items) > _MAX_ITEMS:
        out.append(errors.FieldViolation("…", f"… and {len(items) - _MAX_ITEMS} more"))
    return out


def to_status(err: errors.ShoalError) -> grpc.Status:
    """Encode an error as a gRPC status with google.rpc details (BadRequest, QuotaFailure,
    RetryInfo), cut to fit in a client's metadata limit."""
    return cast(grpc.Status, rpc_status.to_status(status_of(err)))


def log_level(err: errors.ShoalError) -> int:
    """The level at which a server logs a call that ended in `err`."""
    return _code_and_level(err)[1]


def status_of(err: errors.ShoalError) -> status_pb2.Status:
    """`err` as a google.rpc.Status with its details (BadRequest, QuotaFailure, RetryInfo),
    each part cut to a bounded size: what every transport sends."""
    code, _ = _code_and_level(err)
    status = status_pb2.Status(code=code.value[0], message=_cut(err.message, _MAX_MESSAGE))
    violations = _bounded(getattr(err, "violations", []))
    if violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in violations
            ]
        )
        status.details.add().Pack(bad)
    quota = _bounded(getattr(err, "quota", []))
    if quota:
        failure = error_details_pb2.QuotaFailure(
            violations=[
                error_details_pb2.QuotaFailure.Violation(subject=q.field, description=q.description)
                for q in quota
            ]
        )
        status.details.add().Pack(failure)
    retry_after: timedelta | None = getattr(err, "retry_after", None)
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromTimedelta(retry_after)
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return status


def from_server(exc: grpc.RpcError) -> bool:
    """Whether a Shoal server sent this status: it sends every one with google.rpc details, so
    one without them was made by the caller's own channel (refused, unresolvable, a failed
    handshake) or by a proxy."""
    return any(key == _DETAILS_KEY for key, _ in cast(grpc.Call, exc).trailing_metadata() or ())


def from_rpc_error(exc: grpc.RpcError) -> errors.ShoalError:
    """Turn a failed call back into the typed error the server raised."""
    call = cast(grpc.Call, exc)
    code = call.code()
    message = call.details() or code.name
    violations: list[errors.FieldViolation] = []
    quota: list[errors.FieldViolation] = []
    retry_after: timedelta | None = None
    for key, value in call.trailing_metadata() or ():
        if key != _DETAILS_KEY:
            continue
        status = status_pb2.Status.FromString(cast(bytes, value))
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations += [
                    errors.FieldViolation(v.field, v.description) for v in bad.field_violations
                ]
            elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
                failure = error_details_pb2.QuotaFailure()
                detail.Unpack(failure)
                quota += [
                    errors.FieldViolation(v.subject, v.description) for v in failure.violations
                ]
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                retry_after = info.retry_delay.ToTimedelta()
    cls = _BY_CODE.get(code)
    if cls is errors.InvalidArgument:
        return errors.InvalidArgument(message, violations)
    if cls is errors.ResourceExhausted:
        return errors.ResourceExhausted(
            message, retry_after=retry_after, violations=violations, quota=quota
        )
    if cls is None:
        if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
            return errors.Unavailable(f"{code.name.lower()}: {message}")
        return errors.InternalError(f"{code.name}: {message}")
    return cls(message)


async def abort(context: grpc.aio.ServicerContext[Any, Any], err: Exception, method: str) -> None:
    """End the call with the status of `err`; an unexpected error is logged and INTERNAL."""
    if isinstance(err, errors.ShoalError):
        _, level = _code_and_level(err)
        status = status_of(err)  # cut: its message may quote the request (a 3 MB name)
        _log.log(level, "rpc=%s error=%s: %s", method, type(err).__name__, status.message)
        await context.abort_with_status(cast(grpc.Status, rpc_status.to_status(status)))
    if isinstance(err, NotImplementedError):  # what generated servicer bases raise
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented")
    _log.exception("rpc=%s unexpected error", method)
    await context.abort_with_status(to_status(errors.InternalError("internal error")))
