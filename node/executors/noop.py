"""`noop` (a `custom` spec): succeeds, echoing its params; for probes and benchmarks.

A number param `sleep` makes it take that many seconds first (simulated work); a param
`usage` ({"prompt_tokens": N, "completion_tokens": N, "model": "..."}) is reported as what it
used, as an LLM executor would.
"""

from __future__ import annotations

import asyncio
import math

from google.protobuf import json_format

from shoal.node.executors.base import ExecutionContext, Executor, Outcome, register
from shoal.v1 import task_pb2

__all__ = ["NoopExecutor"]


@register
class NoopExecutor(Executor):
    name = "noop"

    async def run(self, spec: task_pb2.TaskSpec, ctx: ExecutionContext) -> Outcome:
        result = task_pb2.TaskResult(exit_code=0)
        sleep = spec.custom.params.fields.get("sleep")
        if sleep is not None and math.isfinite(seconds := sleep.number_value) and seconds > 0:
            await asyncio.sleep(min(seconds, 3600.0))
        if spec.custom.HasField("params"):
            result.output.CopyFrom(spec.custom.params)
        if (usage := spec.custom.params.fields.get("usage")) is not None:
            try:
                json_format.ParseDict(
                    json_format.MessageToDict(usage), result.usage, ignore_unknown_fields=True
                )
            except json_format.ParseError as err:
                result.error = f"params.usage: {err}"
                return Outcome(task_pb2.TASK_STATE_FAILED, result)
        return Outcome(task_pb2.TASK_STATE_SUCCEEDED, result)
