"""The `tool` executor: tools by entry point, sync and async calls, results and failures."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pytest
from google.protobuf import json_format

from shoal import tool
from shoal.config import NodeSettings
from shoal.node.executors.base import ExecutionContext, Outcome
from shoal.node.executors.tool import Tool, ToolExecutor, installed_tools
from shoal.v1 import task_pb2


async def _run(
    executor: ToolExecutor, name: str, data: dict[str, Any] | None = None
) -> tuple[Outcome, list[task_pb2.OutputChunk]]:
    chunks: list[task_pb2.OutputChunk] = []
    ctx = ExecutionContext("t", chunks.append, 4096)
    outcome = await executor.run(tool(name, data), ctx)
    return outcome, chunks


def _with(**tools: Tool) -> ToolExecutor:
    return ToolExecutor(NodeSettings(), tools=tools)


def _output(outcome: Outcome) -> dict[str, Any]:
    return json_format.MessageToDict(outcome.result.output)


def test_installed_tools_come_from_entry_points() -> None:
    # examples/shoal-example, installed by `make dev`, registers them under `shoal.tools`.
    found = installed_tools()
    assert {"slugify", "sleep"} <= found.keys()
    assert {"slugify", "sleep"} <= set(ToolExecutor(NodeSettings()).tools())


def test_the_tools_setting_picks_what_a_node_offers(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "shoal.node"):
        executor = ToolExecutor(NodeSettings(tools=["slugify", "absent"]))
    assert executor.tools() == ["slugify"]
    assert "tool=absent is in the node's tools but not installed" in caplog.text
    assert executor.available()
    assert not ToolExecutor(NodeSettings(tools=["absent"])).available()


async def test_an_installed_tool_is_called_with_the_input() -> None:
    outcome, _ = await _run(ToolExecutor(NodeSettings()), "slugify", {"text": "Héllo, World!"})
    assert outcome.state == task_pb2.TASK_STATE_SUCCEEDED, outcome.result
    assert _output(outcome) == {"slug": "hello-world"}


async def test_sync_tools_run_in_a_thread_and_async_ones_on_the_loop() -> None:
    loop_thread = threading.get_ident()

    def where(data: dict[str, Any]) -> dict[str, bool]:
        return {"on_loop": threading.get_ident() == loop_thread}

    async def where_async(data: dict[str, Any]) -> dict[str, bool]:
        await asyncio.sleep(0)
        return {"on_loop": threading.get_ident() == loop_thread}

    class Callable:
        async def __call__(self, data: dict[str, Any]) -> dict[str, bool]:
            return {"on_loop": threading.get_ident() == loop_thread}

    executor = _with(sync=where, coroutine=where_async, instance=Callable())
    for name, on_loop in [("sync", False), ("coroutine", True), ("instance", True)]:
        outcome, _ = await _run(executor, name)
        assert _output(outcome) == {"on_loop": on_loop}, name


async def test_whole_numbers_arrive_as_int_and_other_values_are_wrapped() -> None:
    seen: list[Any] = []

    def add(data: dict[str, Any]) -> Any:
        seen.append(data)
        return data["a"] + data["b"]

    outcome, _ = await _run(_with(add=add), "add", {"a": 2, "b": 3, "c": [1.5, {"d": 4}]})
    assert seen == [{"a": 2, "b": 3, "c": [1.5, {"d": 4}]}]
    assert isinstance(seen[0]["a"], int)
    assert _output(outcome) == {"result": 5}


async def test_an_exception_fails_the_task_with_its_traceback() -> None:
    outcome, chunks = await _run(ToolExecutor(NodeSettings()), "slugify", {"text": 3})
    assert outcome.state == task_pb2.TASK_STATE_FAILED
    assert not outcome.result.infrastructure_failure
    assert outcome.result.error == (
        "tool slugify raised TypeError: input.text must be a string, not int"
    )
    assert "Traceback" in outcome.result.stderr
    assert outcome.result.stderr.rstrip().endswith("not int")
    assert [c.stream for c in chunks] == [task_pb2.OUTPUT_STREAM_STDERR]
    assert chunks[0].data == outcome.result.stderr


@pytest.mark.parametrize(
    ("value", "kind"), [({1, 2}, "set"), (float("nan"), "float"), ({"x": object()}, "dict")]
)
async def test_a_value_that_is_not_json_fails_the_task(value: object, kind: str) -> None:
    outcome, _ = await _run(_with(bad=lambda data: value), "bad")
    assert outcome.state == task_pb2.TASK_STATE_FAILED
    assert not outcome.result.infrastructure_failure
    assert outcome.result.error.startswith(f"tool bad returned a value that is not JSON ({kind})")


async def test_a_tool_this_node_does_not_offer_is_the_tasks_failure() -> None:
    executor = ToolExecutor(NodeSettings(tools=["slugify"]))
    outcome, _ = await _run(executor, "sleep", {"seconds": 0})
    assert outcome.state == task_pb2.TASK_STATE_FAILED
    # The coordinator places tool tasks by the tools nodes offer: only a caller that picked
    # this node gets here, and the node is not to blame.
    assert not outcome.result.infrastructure_failure
    assert outcome.result.error == "tool 'sleep' is not offered here (this node offers slugify)"
