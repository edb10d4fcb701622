"""Tasks.List's filters and Get's downstream tasks over the HTTP/JSON API, as the dashboard
calls them: applied by the coordinator, paged, and refusing bad values by field name."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import httpx
import pytest

from shoal.v1 import tasks_pb2, tasks_pb2_grpc

from .harness import Mesh, MeshFactory

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def mesh(mesh_factory: MeshFactory) -> Mesh:
    return await mesh_factory(
        slots=4, executors=["noop", "shell"], coordinator={"http_listen": "127.0.0.1:0"}
    )


@pytest.fixture
async def http(mesh: Mesh) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=mesh.coordinator.http_url,
        timeout=20,
        headers={"Authorization": f"Bearer {mesh.token}"},
    ) as client:
        yield client


async def call(http: httpx.AsyncClient, method: str, body: dict[str, Any]) -> Any:
    response = await http.post(f"/api/shoal.v1.Tasks/{method}", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def noop(**spec: Any) -> dict[str, Any]:
    return {"custom": {"executor": "noop"}, **spec}


async def test_downstream_tasks_are_listed_after_their_upstream_finished(
    http: httpx.AsyncClient,
) -> None:
    specs = [
        noop(),
        noop(dependsOn=[{"batchIndex": 0}]),
        {"shell": {"argv": ["true"]}, "dependsOn": [{"batchIndex": 0}]},
        noop(dependsOn=[{"batchIndex": 2}]),
    ]
    ids = (await call(http, "SubmitBatch", {"specs": specs}))["taskIds"]
    for tid in ids:
        done = await call(http, "Wait", {"taskId": tid, "timeout": "20s"})
        assert done["state"] == "TASK_STATE_SUCCEEDED", done
    up = await call(http, "Get", {"taskId": ids[0], "includeDependents": True})
    assert up["dependents"] == ids[1:3]
    middle = await call(http, "Get", {"taskId": ids[2], "includeDependents": True})
    assert middle["dependsOn"] == [ids[0]] and middle["dependents"] == [ids[3]]
    # Only asked for: a plain Get reads nothing more.
    assert "dependents" not in await call(http, "Get", {"taskId": ids[0]})


async def test_list_filters_by_executor_labels_and_time_on_the_server(
    http: httpx.AsyncClient,
) -> None:
    start = datetime.now(UTC) - timedelta(seconds=1)
    specs = [
        noop(metadata={"team": "ml" if i % 2 else "web", "run": str(i)}) for i in range(12)
    ] + [{"shell": {"argv": ["true"]}, "metadata": {"team": "web"}}]
    ids = (await call(http, "SubmitBatch", {"specs": specs}))["taskIds"]
    web = [ids[i] for i in range(12) if i % 2 == 0]

    async def listed(**filters: Any) -> list[str]:
        got: list[str] = []
        token = ""
        while True:
            page = await call(http, "List", {**filters, "limit": 2, "pageToken": token})
            got += [t["id"] for t in page.get("tasks", [])]
            token = page.get("nextPageToken", "")
            if not token:
                return got

    assert await listed(executor="noop", labels={"team": "web"}) == web[::-1]
    assert await listed(labels={"team": "web"}) == [ids[12], *web[::-1]]
    assert await listed(labels={"team": "web", "run": "4"}) == [ids[4]]
    assert await listed(executor="shell") == [ids[12]]
    assert await listed(executor="docker") == []
    assert len(await listed(createdAfter=start.isoformat())) == 13
    assert await listed(createdBefore=start.isoformat()) == []


async def test_bad_filters_are_refused_naming_the_field(http: httpx.AsyncClient) -> None:
    now = datetime.now(UTC)
    cases = [
        ({"labels": {"": "x"}}, "labels"),
        ({"labels": {"k": "v" * 300}}, "labels"),
        ({"labels": {f"k{i}": "v" for i in range(5)}}, "labels"),
        ({"executor": "x" * 300}, "executor"),
        ({"executor": "a\nb"}, "executor"),
        (
            {"createdAfter": now.isoformat(), "createdBefore": (now - timedelta(1)).isoformat()},
            "created_before",
        ),
    ]
    for body, field in cases:
        response = await http.post("/api/shoal.v1.Tasks/List", json=body)
        assert response.status_code == 400, response.text
        error = response.json()
        assert error["code"] == "invalid_argument" and field in error["message"], error
        (detail,) = error["details"]
        assert detail["fieldViolations"][0]["field"].startswith(field), error
    bad_time = await http.post("/api/shoal.v1.Tasks/List", json={"createdAfter": "yesterday"})
    assert bad_time.status_code == 400 and "createdAfter" in bad_time.json()["message"]


async def test_a_time_out_of_range_over_grpc_is_refused_naming_the_field(mesh: Mesh) -> None:
    """JSON cannot carry such a time; protobuf can (the fuzzer sent seconds=2**61)."""
    auth = (("authorization", f"Bearer {mesh.token}"),)
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        stub = tasks_pb2_grpc.TasksStub(channel)
        for field in ("created_after", "created_before"):
            request = tasks_pb2.ListRequest()
            getattr(request, field).seconds = 2**61
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.List(request, metadata=auth)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"{field} must be a time between 1970 and 9999" in str(refused.value.details())
