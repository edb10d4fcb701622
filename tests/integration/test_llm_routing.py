"""LLM routing: an llm task prefers local Ollama and falls back to a cloud provider when the
Ollama node's breaker is open (or its budget is spent), through a real mesh and stand-ins."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from shoal import AsyncClient, llm, retry
from shoal.v1 import admin_pb2, task_pb2
from tests.standins import OllamaStandIn, OpenAIStandIn

from .harness import Mesh, MeshFactory, free_port

pytestmark = pytest.mark.timeout(60)

ROUTES = [("ollama", "llama3"), ("openai", "gpt-4o-mini")]


@pytest.fixture
async def ollama() -> AsyncIterator[OllamaStandIn]:
    async with OllamaStandIn(models=["llama3"]) as standin:
        yield standin


@pytest.fixture
async def openai() -> AsyncIterator[OpenAIStandIn]:
    async with OpenAIStandIn(models=["gpt-4o-mini"], api_key="sk-test") as standin:
        yield standin


async def _two_nodes(
    mesh_factory: MeshFactory, ollama: OllamaStandIn, openai: OpenAIStandIn
) -> Mesh:
    """A node with Ollama and no cloud key ("local"), one with an OpenAI key ("cloud")."""
    mesh = await mesh_factory(
        slots=2,
        node_id="local",
        ollama_host=ollama.url,
        coordinator={"breaker_threshold": 2, "breaker_cooldown": timedelta(minutes=5)},
    )
    await mesh.start_node(
        node_id="cloud",
        slots=2,
        ollama_host=f"http://127.0.0.1:{free_port()}",  # nothing there
        llm_openai_api_key="sk-test",
        llm_openai_base_url=f"{openai.url}/v1",
    )
    return mesh


async def _done(client: AsyncClient, task_id: str) -> task_pb2.Task:
    return await asyncio.wait_for(client.wait(task_id), 30)


async def test_an_llm_task_prefers_ollama_and_falls_back_to_the_cloud_when_its_breaker_opens(
    mesh_factory: MeshFactory, ollama: OllamaStandIn, openai: OpenAIStandIn
) -> None:
    client = (await _two_nodes(mesh_factory, ollama, openai)).client
    policy = retry(4, backoff=timedelta(milliseconds=50))

    # Ollama answers: the first route is taken.
    first = await client.submit(llm(routes=ROUTES, prompt="hi", retry=policy))
    done = await _done(client, first.id)
    assert done.state == task_pb2.TASK_STATE_SUCCEEDED, done
    assert (done.node_id, done.result.output["provider"]) == ("local", "ollama")
    assert (done.spec.llm.provider, done.spec.model, done.spec.backend) == (
        "ollama",
        "llama3",
        "ollama",
    )

    # Ollama fails (500): two infrastructure failures open the local node's llm breaker, and
    # the retry goes to the cloud.
    ollama.status = 500
    second = await client.submit(llm(routes=ROUTES, prompt="hi", retry=policy))
    done = await _done(client, second.id)
    assert done.state == task_pb2.TASK_STATE_SUCCEEDED, done
    assert (done.node_id, done.result.output["provider"]) == ("cloud", "openai")
    assert [(a.node_id, a.result.infrastructure_failure) for a in done.attempts] == [
        ("local", True),
        ("local", True),
    ]
    local = next(n for n in await client.nodes() if n.info.node_id == "local")
    assert {(b.key, b.state) for b in local.breakers} == {
        ("node:local", task_pb2.BREAKER_STATE_OPEN),
        ("node:local/llm", task_pb2.BREAKER_STATE_OPEN),
    }

    # While it is open, a new task goes to the cloud at once.
    third = await client.submit(llm(routes=ROUTES, prompt="hi"))
    done = await _done(client, third.id)
    assert (done.state, done.node_id, len(done.attempts)) == (
        task_pb2.TASK_STATE_SUCCEEDED,
        "cloud",
        0,
    )


async def test_a_spent_budget_sends_llm_tasks_to_the_next_route(
    mesh_factory: MeshFactory, ollama: OllamaStandIn, openai: OpenAIStandIn
) -> None:
    client = (await _two_nodes(mesh_factory, ollama, openai)).client
    await client.set_quota(admin_pb2.Quota(key="backend:ollama", requests_per_day=1))
    first = await client.submit(llm(routes=ROUTES, prompt="hi"))
    done = await _done(client, first.id)
    assert (done.node_id, done.spec.llm.provider) == ("local", "ollama")
    # That used the day's one Ollama request: the next goes to the cloud rather than wait.
    second = await client.submit(llm(routes=ROUTES, prompt="hi"))
    done = await _done(client, second.id)
    assert (done.state, done.node_id, done.spec.llm.provider) == (
        task_pb2.TASK_STATE_SUCCEEDED,
        "cloud",
        "openai",
    )
