"""`python`: code run by an isolated interpreter (`python -I`: no user site, no PYTHON* env)."""

from __future__ import annotations

import sys

from shoal.config import NodeSettings
from shoal.node.executors.base import ExecutionContext, Executor, Outcome, register
from shoal.node.executors.process import run_process
from shoal.node.executors.taskuser import task_user
from shoal.v1 import task_pb2

__all__ = ["PythonExecutor"]


@register
class PythonExecutor(Executor):
    name = "python"

    def __init__(self, settings: NodeSettings) -> None:
        super().__init__(settings)
        self.user = task_user(settings.run_as)

    async def run(self, spec: task_pb2.TaskSpec, ctx: ExecutionContext) -> Outcome:
        py = spec.python
        argv = [sys.executable, "-I", "-c", py.code, *py.args]
        return await run_process(argv, ctx, env=py.env, cwd=py.cwd, stdin=py.stdin, user=self.user)
