"""http, tool and a third-party executor (examples/shoal-example) through a real mesh."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from google.protobuf import json_format

from shoal import Client, TaskFailed
from shoal.node.executors.tool import ToolExecutor
from shoal.specs import is_final
from shoal.v1 import task_pb2
from tests.contract.loopback import LoopbackHttp

from .harness import MeshFactory, collect


@pytest.fixture
async def server() -> AsyncIterator[LoopbackHttp]:
    async with LoopbackHttp() as http:
        yield http


async def test_an_http_task_returns_the_response(
    mesh_factory: MeshFactory, server: LoopbackHttp
) -> None:
    mesh = await mesh_factory(slots=2, http_allow_hosts=[f"127.0.0.1:{server.port}"])
    spec = task_pb2.TaskSpec(http=task_pb2.HttpSpec(url=server.url("/json")))
    task = await mesh.client.wait((await mesh.client.submit(spec)).id)
    assert task.state == task_pb2.TASK_STATE_SUCCEEDED, task.result
    assert task.result.exit_code == 200
    assert json_format.MessageToDict(task.result.output)["json"] == {"greeting": "hello", "n": 3}
    [body] = task.result.artifacts
    assert json.loads(body.data) == {"greeting": "hello", "n": 3}


async def test_the_example_executor_streams_its_progress(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(slots=2)
    assert "wordcount" in mesh.node.info().executors  # found by its entry point
    spec = task_pb2.TaskSpec(custom=task_pb2.CustomSpec(executor="wordcount"))
    spec.custom.params.update({"text": "the quick brown fox\njumps over the lazy dog"})
    events = await asyncio.wait_for(
        collect(mesh.client.run(spec), lambda e: is_final(e.state) and not e.HasField("output")),
        20,
    )
    progress = [e.output.data for e in events if e.output.stream == task_pb2.OUTPUT_STREAM_PROGRESS]
    assert progress == ["line 1/2: 4 words\n", "line 2/2: 5 words\n"]
    final = events[-1]
    assert final.state == task_pb2.TASK_STATE_SUCCEEDED, final.result
    output = json_format.MessageToDict(final.result.output)
    assert (output["words"], output["lines"], output["top"]["the"]) == (9, 2, 2)


async def test_a_tool_is_offered_and_called_from_the_sdk(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(slots=2)
    offered = mesh.node.executors["tool"]
    assert isinstance(offered, ToolExecutor)
    assert {"slugify", "sleep"} <= set(offered.tools())
    assert {"slugify", "sleep"} <= set(mesh.node.info().tools)  # what the node advertises
    assert await mesh.client.call_tool("slugify", {"text": "Hello, World!"}) == {
        "slug": "hello-world"
    }
    # What the tool returned, as plain values: not the Struct the node carries it in.
    slept = await mesh.client.call_tool("sleep", {"seconds": 0})
    assert slept == 0 and isinstance(slept, int)

    with pytest.raises(TaskFailed) as failed:
        await mesh.client.call_tool("slugify", {"text": 3})
    assert failed.value.task.state == task_pb2.TASK_STATE_FAILED
    assert "tool slugify raised TypeError: input.text must be a string" in failed.value.message

    def blocking() -> object:
        with Client(mesh.address, token=mesh.token) as client:
            return client.call_tool("slugify", {"text": "Blocking Call"})

    assert await asyncio.to_thread(blocking) == {"slug": "blocking-call"}
