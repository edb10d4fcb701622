"""`noop` (a `custom` spec): succeeds at once, echoing its params; for probes and benchmarks."""

from __future__ import annotations

from shoal.node.executors.base import ExecutionContext, Executor, Outcome, register
from shoal.v1 import task_pb2

__all__ = ["NoopExecutor"]


@register
class NoopExecutor(Executor):
    name = "noop"

    async def run(self, spec: task_pb2.TaskSpec, ctx: ExecutionContext) -> Outcome:
        result = task_pb2.TaskResult(exit_code=0)
        if spec.custom.HasField("params"):
            result.output.CopyFrom(spec.custom.params)
        return Outcome(task_pb2.TASK_STATE_SUCCEEDED, result)
