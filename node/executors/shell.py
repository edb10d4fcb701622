"""`shell`: a command as argv (no shell), or a script run by a shell (default /bin/sh)."""

from __future__ import annotations

from shoal.config import NodeSettings
from shoal.node.executors.base import ExecutionContext, Executor, Outcome, register
from shoal.node.executors.process import run_process
from shoal.node.executors.taskuser import TaskUsers
from shoal.v1 import task_pb2

__all__ = ["ShellExecutor"]


@register
class ShellExecutor(Executor):
    name = "shell"

    def __init__(self, settings: NodeSettings) -> None:
        super().__init__(settings)
        self.users = TaskUsers(settings.run_as)

    async def run(self, spec: task_pb2.TaskSpec, ctx: ExecutionContext) -> Outcome:
        sh = spec.shell
        argv = list(sh.argv) if sh.argv else [sh.shell or "/bin/sh", "-c", sh.script]
        return await run_process(
            argv, ctx, env=sh.env, cwd=sh.cwd, stdin=sh.stdin, users=self.users
        )
