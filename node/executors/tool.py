"""`tool`: a named Python callable installed on the node, called with the task's JSON input.

Tools come from the entry-point group `shoal.tools` (name -> a callable taking one dict and
returning a JSON-able value); `NodeSettings.tools` picks those a node offers. A sync tool runs
in a thread (a cancelled task stops waiting for it, but the thread runs the call to its end);
an async tool is awaited on the node's loop, and cancelled with its task.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import traceback
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any

from google.protobuf import json_format

from shoal.config import NodeSettings
from shoal.node.executors.base import ExecutionContext, Executor, Outcome, TaskError, register
from shoal.v1 import node_pb2, task_pb2

__all__ = ["Tool", "ToolExecutor", "installed_tools"]

_log = logging.getLogger("shoal.node")

Tool = Callable[[dict[str, Any]], Any]
"""A tool: one dict (the task's JSON input) in, a JSON-able value (or an awaitable of one) out."""

_EXACT = 2**53  # whole numbers a double holds exactly


def installed_tools() -> dict[str, Tool]:
    """Every tool of the `shoal.tools` entry points that loads (others are logged, skipped)."""
    found: dict[str, Tool] = {}
    for ep in entry_points(group="shoal.tools"):
        if ep.name in found:
            _log.warning("tool=%s is installed twice: %s is not offered", ep.name, ep.value)
            continue
        try:
            tool = ep.load()
        except Exception as err:  # a broken third-party package must not stop the node
            _log.warning("tool=%s cannot be loaded from %s: %r", ep.name, ep.value, err)
            continue
        if not callable(tool):
            _log.warning("tool=%s: %s is not callable", ep.name, ep.value)
            continue
        found[ep.name] = tool
    return found


def _plain(value: Any) -> Any:
    """JSON from a Struct with whole numbers as int, as a JSON parser gives them (a Struct
    holds every number as a double)."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= _EXACT:
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _is_async(tool: Tool) -> bool:
    # A function, or an object whose class defines `async def __call__`.
    return inspect.iscoroutinefunction(tool) or inspect.iscoroutinefunction(type(tool).__call__)


def _failed(error: str, **fields: Any) -> Outcome:
    return Outcome(task_pb2.TASK_STATE_FAILED, task_pb2.TaskResult(error=error, **fields))


@register
class ToolExecutor(Executor):
    """Offers the installed tools `settings.tools` names (or all), or those of `tools`."""

    name = "tool"

    def __init__(self, settings: NodeSettings, *, tools: Mapping[str, Tool] | None = None) -> None:
        super().__init__(settings)
        found = dict(tools) if tools is not None else installed_tools()
        wanted = set(settings.tools)
        for missing in sorted(wanted - found.keys()):
            _log.warning("tool=%s is in the node's tools but not installed", missing)
        self._tools = {n: t for n, t in found.items() if not wanted or n in wanted}

    def available(self) -> bool:
        return bool(self._tools)

    def tools(self) -> list[str]:
        """The names of the tools this node offers, sorted."""
        return sorted(self._tools)

    def offers(self, info: node_pb2.NodeInfo) -> None:
        info.tools.extend(self.tools())

    async def run(self, spec: task_pb2.TaskSpec, ctx: ExecutionContext) -> Outcome:
        name = spec.tool.name
        tool = self._tools.get(name)
        if tool is None:
            # The task's: the coordinator sends a tool task only to nodes that offer its tool,
            # so only a caller that picked the node itself gets here.
            return TaskError(
                f"tool {name!r} is not offered here"
                f" (this node offers {', '.join(self.tools()) or 'none'})"
            ).outcome()
        data = _plain(json_format.MessageToDict(spec.tool.input))
        try:
            value = await tool(data) if _is_async(tool) else await asyncio.to_thread(tool, data)
        except (Exception, SystemExit) as err:  # sys.exit() in a tool ends the tool, not the node
            text = ctx.redactor.redact("".join(traceback.format_exception(err)))
            text = text[-ctx.output_tail_bytes :]
            ctx.emit(task_pb2.OutputChunk(stream=task_pb2.OUTPUT_STREAM_STDERR, data=text))
            return _failed(f"tool {name} raised {type(err).__name__}: {err}", stderr=text)
        result = task_pb2.TaskResult(exit_code=0)
        try:
            plain = json.loads(json.dumps(value, allow_nan=False))
            result.output.update(plain if isinstance(plain, dict) else {"result": plain})
        except (TypeError, ValueError, OverflowError, RecursionError) as err:
            return _failed(
                f"tool {name} returned a value that is not JSON ({type(value).__name__}): {err}"
            )
        return Outcome(task_pb2.TASK_STATE_SUCCEEDED, result)
