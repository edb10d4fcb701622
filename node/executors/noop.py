"""`noop` (a `custom` spec): succeeds, echoing its params; for probes and benchmarks.

A number param `sleep` makes it take that many seconds first (simulated work).
"""

from __future__ import annotations

import asyncio
import math

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
        return Outcome(task_pb2.TASK_STATE_SUCCEEDED, result)
