"""The SDK's spec builders: what they make, and what they say of a bad choice."""

from __future__ import annotations

from datetime import timedelta

import pytest
from google.protobuf import json_format

from shoal import InvalidArgument, custom, docker, http, noop, shell, tool
from shoal.v1 import task_pb2


def test_a_priority_not_known_names_the_ones_allowed() -> None:
    with pytest.raises(InvalidArgument) as refused:
        shell("true", priority="urgent")
    allowed = "critical, high, normal, low, background"
    assert refused.value.message == f"priority must be one of {allowed}, not 'urgent'"
    assert [v.field for v in refused.value.violations] == ["priority"]
    assert shell("true", priority="high").priority == task_pb2.PRIORITY_HIGH
    assert shell("true", priority=task_pb2.PRIORITY_LOW).priority == task_pb2.PRIORITY_LOW


def test_resources_are_a_request_or_a_mapping_of_amounts() -> None:
    wanted = task_pb2.ResourceRequest(cpu=0.5, memory_mb=256, gpus=1, slots=2)
    made = shell("true", resources={"cpu": 0.5, "memory_mb": 256, "gpus": 1, "slots": 2})
    assert made.resources == wanted
    assert shell("true", resources=wanted).resources == wanted
    assert noop(resources={"slots": 3}).resources == task_pb2.ResourceRequest(slots=3)
    with pytest.raises(InvalidArgument) as refused:
        shell("true", resources={"memory": 1})
    assert [v.field for v in refused.value.violations] == ["resources.memory"]


def test_a_pull_policy_not_known_names_the_ones_allowed() -> None:
    with pytest.raises(InvalidArgument, match="pull must be one of never, if_missing, always"):
        docker("alpine", pull="sometimes")


def test_http_builds_a_request() -> None:
    spec = http(
        "https://api.example.com/x",
        method="POST",
        headers={"Authorization": "Bearer ${{ secrets.api-token }}"},
        body='{"a": 1}',
        name="post",
    )
    assert spec.WhichOneof("kind") == "http"
    assert (spec.http.method, spec.http.url, spec.http.body) == (
        "POST",
        "https://api.example.com/x",
        b'{"a": 1}',
    )
    assert dict(spec.http.headers) == {"Authorization": "Bearer ${{ secrets.api-token }}"}
    assert spec.name == "post"
    assert http("https://example.com").http.method == "GET"


def test_custom_builds_a_task_for_a_third_party_executor() -> None:
    spec = custom("quantum", {"qubits": 4, "circuit": ["h", "cx"]}, tenant="acme")
    assert spec.WhichOneof("kind") == "custom"
    assert spec.custom.executor == "quantum" and spec.tenant == "acme"
    assert json_format.MessageToDict(spec.custom.params) == {"qubits": 4, "circuit": ["h", "cx"]}
    assert noop({"a": "b"}) == custom("noop", {"a": "b"})


def test_a_tool_task_may_have_a_name() -> None:
    spec = tool("slugify", {"text": "x"}, name="slug it")
    assert (spec.tool.name, spec.name) == ("slugify", "slug it")


@pytest.mark.parametrize("given", [2.5, timedelta(seconds=2.5)])
def test_a_timeout_is_seconds_or_a_timedelta(given: float | timedelta) -> None:
    spec = shell("true", timeout=given, queue_timeout=given)
    assert spec.timeout.ToTimedelta() == spec.queue_timeout.ToTimedelta() == timedelta(seconds=2.5)


@pytest.mark.parametrize("given", [-1, float("nan"), "3", True])
def test_a_timeout_that_is_no_span_is_refused_where_it_is_written(given: object) -> None:
    with pytest.raises((ValueError, TypeError), match="timeout must be"):
        shell("true", timeout=given)
