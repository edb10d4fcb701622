"""`python`: code run by an isolated interpreter (`python -I`: no user site, no PYTHON* env)."""

from __future__ import annotations

import sys

from shoal.node.executors.base import ExecutionContext, Executor, Outcome, register
from shoal.node.executors.process import run_process
from shoal.v1 import task_pb2

__all__ = ["PythonExecutor"]


@register
class PythonExecutor(Executor):
    name = "python"

    async def run(self, spec: task_pb2.TaskSpec, ctx: ExecutionContext) -> Outcome:
        py = spec.python
        argv = [sys.executable, "-I", "-c", py.code, *py.args]
        return await run_process(argv, ctx, env=py.env, cwd=py.cwd, stdin=py.stdin)
