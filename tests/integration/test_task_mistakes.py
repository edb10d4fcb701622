"""A task's own mistakes fail that task only: no breaker opens, nothing is retried as an
infrastructure failure, and the nodes go on serving everyone (a real coordinator, two nodes)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta

import pytest

from shoal import AsyncClient, retry, shell
from shoal.v1 import task_pb2

from .harness import Mesh, MeshFactory

pytestmark = pytest.mark.timeout(60)

WAIT = timedelta(seconds=30)
# A breaker that opened would stay open for the whole test: a task that still runs proves
# that none did.
BREAKERS = {"breaker_threshold": 2, "breaker_cooldown": timedelta(minutes=10)}


async def two_nodes(mesh_factory: MeshFactory) -> Mesh:
    """A coordinator whose breakers open after two infrastructure failures, and two nodes
    that allow one http host and hold no secrets."""
    settings = {"slots": 2, "http_allow_hosts": ["allowed.invalid"]}
    mesh = await mesh_factory(node_id="one", coordinator=BREAKERS, **settings)
    await mesh.start_node(node_id="two", **settings)
    return mesh


async def no_breakers(client: AsyncClient) -> None:
    nodes = await client.nodes()
    assert sorted(n.info.node_id for n in nodes) == ["one", "two"]
    assert [(n.info.node_id, b.key) for n in nodes for b in n.breakers] == []


def missing_secret(i: int) -> task_pb2.TaskSpec:
    spec = shell("true", retry=retry(3, on_exit=False, backoff=timedelta(milliseconds=10)))
    spec.secrets.add(name=f"nobody-has-{i}", env="ABSENT")
    return spec


def refused_host(i: int) -> task_pb2.TaskSpec:
    spec = task_pb2.TaskSpec(http=task_pb2.HttpSpec(url=f"http://elsewhere-{i}.invalid/"))
    spec.retry.CopyFrom(retry(3, on_exit=False, backoff=timedelta(milliseconds=10)))
    return spec


@pytest.mark.parametrize(
    ("mistake", "error"),
    [
        (missing_secret, "secrets not configured on this node"),
        (refused_host, "is not in this node's http_allow_hosts"),
    ],
)
async def test_tasks_that_cannot_run_anywhere_open_no_breaker(
    mesh_factory: MeshFactory, mistake: Callable[[int], task_pb2.TaskSpec], error: str
) -> None:
    mesh = await two_nodes(mesh_factory)
    client = mesh.client

    ids = await client.submit_batch(mistake(i) for i in range(12))
    done = await asyncio.gather(*(client.wait(i, timeout=WAIT) for i in ids))

    for task in done:
        assert task.state == task_pb2.TASK_STATE_FAILED, task
        assert error in task.result.error
        assert not task.result.infrastructure_failure
        assert not task.attempts  # no earlier attempt: not retried as an infrastructure failure
    assert {t.node_id for t in done} == {"one", "two"}  # both nodes saw them
    await no_breakers(client)
    other = await client.wait((await client.submit(shell("echo served"))).id, timeout=WAIT)
    assert other.state == task_pb2.TASK_STATE_SUCCEEDED, other
    assert other.result.stdout == "served\n"
