"""Errors turned into gRPC statuses: what a request made long is cut to fit in metadata."""

from __future__ import annotations

import base64
import logging
import urllib.parse

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from shoal import errors
from shoal._status import abort, to_status

METADATA_LIMIT = 8 << 10
"""What a grpc client accepts in trailing metadata by default."""


def test_a_huge_error_fits_in_a_clients_metadata_limit() -> None:
    long = "é🙂" * 20_000
    err = errors.ResourceExhausted(
        long,
        violations=[errors.FieldViolation(f"specs[{i}].{long}", long) for i in range(10_000)],
        quota=[errors.FieldViolation(long, long) for _ in range(10_000)],
    )

    status = to_status(err)

    [(key, details)] = status.trailing_metadata
    sent = len(urllib.parse.quote(status.details, safe="")) + len(base64.b64encode(details))
    assert key == "grpc-status-details-bin" and sent < METADATA_LIMIT * 3 // 4
    assert status.details.startswith("é🙂") and status.details.endswith("…")
    decoded = status_pb2.Status.FromString(details)
    bad, quota = error_details_pb2.BadRequest(), error_details_pb2.QuotaFailure()
    decoded.details[0].Unpack(bad)
    decoded.details[1].Unpack(quota)
    fields = [v.field for v in bad.field_violations]
    assert fields[0].startswith("specs[0].é🙂") and fields[-1] == "…"
    assert bad.field_violations[-1].description == f"… and {10_000 - len(fields) + 1} more"
    assert quota.violations[-1].description == bad.field_violations[-1].description


def test_a_short_error_is_sent_whole() -> None:
    err = errors.InvalidArgument("spec.x: bad", [errors.FieldViolation("spec.x", "bad")])

    status = to_status(err)

    assert status.details == "spec.x: bad"
    decoded = status_pb2.Status.FromString(status.trailing_metadata[0][1])
    bad = error_details_pb2.BadRequest()
    decoded.details[0].Unpack(bad)
    assert [(v.field, v.description) for v in bad.field_violations] == [("spec.x", "bad")]


async def test_an_error_is_logged_cut_as_it_is_sent(caplog: pytest.LogCaptureFixture) -> None:
    """Its message may quote the request: a 3 MB name made a 3 MB log line."""

    class Aborted(Exception):
        pass

    class Context:  # as gRPC's: aborting raises
        async def abort_with_status(self, status: grpc.Status) -> None:
            raise Aborted

    context = Context()
    huge = "g" * 3_000_000
    refused = errors.PermissionDenied(f"no access to tenant {huge!r}")
    with caplog.at_level(logging.INFO, logger="shoal.rpc"), pytest.raises(Aborted):
        await abort(context, refused, "List")
    (record,) = caplog.records
    assert len(record.getMessage()) < 1000 and "PermissionDenied" in record.getMessage()
