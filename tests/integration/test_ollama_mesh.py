"""An Ollama chat through a real in-process mesh: its tokens reach a Watch subscriber while it
runs, and the tokens it used count against a token quota on its model.

Against the Ollama stand-in, or a real Ollama server when SHOAL_TEST_OLLAMA_URL (and
SHOAL_TEST_OLLAMA_MODEL) are set.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from shoal import ollama
from shoal.specs import is_final
from shoal.v1 import admin_pb2, task_pb2
from tests.standins import TOKENS, OllamaTarget, ollama_target

from .harness import MeshFactory, eventually

pytestmark = pytest.mark.timeout(90)
WAIT = timedelta(seconds=60)


@pytest.fixture
async def target() -> AsyncIterator[OllamaTarget]:
    async with ollama_target() as t:
        yield t


async def minute_with_room(seconds: float) -> None:
    """Return once the UTC minute has more than `seconds` left: token-per-minute counts start
    again each minute, and the test needs its two tasks in one."""

    def room() -> None:
        assert 60.0 - time.time() % 60.0 > seconds

    await eventually(room, timeout=seconds + 1.0, interval=0.05)


async def test_an_ollama_chat_streams_to_a_watcher_and_counts_against_a_token_quota(
    mesh_factory: MeshFactory, target: OllamaTarget
) -> None:
    mesh = await mesh_factory(slots=2, ollama_host=target.url, models=[target.model])
    assert "ollama" in mesh.node.executors  # its server answered when the node started
    client = mesh.client
    key = f"model:{target.model}"
    # One token a minute: the first task passes (nothing used yet), what it uses exceeds it.
    await client.set_quota(admin_pb2.Quota(key=key, tokens_per_minute=1))
    standin = target.standin
    release = asyncio.Event()
    if standin is not None:
        standin.hold = release  # the last token waits until the watcher saw the first
    # A real server may first load its model.
    await minute_with_room(3.0 if standin is not None else 30.0)

    spec = ollama(
        target.model,
        messages=[{"role": "user", "content": "Say hello."}],
        options={"num_predict": 8},
    )
    task = await client.submit(spec)
    tokens: list[str] = []
    final: task_pb2.Event | None = None
    events = client.watch(since=task.created_seq - 1, task_ids=[task.id], output=True)
    async with contextlib.aclosing(events):
        async for event in events:
            if event.HasField("output"):
                assert event.output.stream == task_pb2.OUTPUT_STREAM_STDOUT
                if not tokens:
                    # The first token reached the watcher while the task still ran.
                    assert event.state == task_pb2.TASK_STATE_RUNNING
                    if standin is not None:  # and runs on: its last token is held
                        running = await client.get(task.id)
                        assert running.state == task_pb2.TASK_STATE_RUNNING
                    release.set()
                tokens.append(event.output.data)
            elif is_final(event.state):
                final = event
                break
    assert final is not None and final.state == task_pb2.TASK_STATE_SUCCEEDED, final
    result = final.result
    assert "".join(tokens) == result.output["text"] == result.stdout
    used = result.usage.prompt_tokens + result.usage.completion_tokens
    assert used > 1 and result.usage.model == target.model
    if standin is not None:
        assert tokens == list(TOKENS)  # each token its own event, in order
        assert used == standin.prompt_tokens + len(TOKENS)

    async def counted() -> None:
        day, month = await client.usage(key)
        assert (day.tokens, month.tokens, day.requests) == (used, used, 1)

    await eventually(counted, timeout=10.0)

    second = await client.submit(spec)

    async def held() -> task_pb2.Task:
        waiting = await client.get(second.id)
        assert f"1 tokens a minute used (or reserved) by {key}" in waiting.pending_reason
        return waiting

    waiting = await eventually(held, timeout=10.0)
    assert waiting.state in (task_pb2.TASK_STATE_PENDING, task_pb2.TASK_STATE_QUEUED)
    await client.cancel(second.id)
