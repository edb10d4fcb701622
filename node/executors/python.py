"""`python`: code run by an isolated interpreter (`python -I`: no user site, no PYTHON* env)."""

from __future__ import annotations

import asyncio
import logging
import sys

from shoal.config import NodeSettings
from shoal.node.executors.base import ExecutionContext, Executor, Outcome, register
from shoal.node.executors.process import run_process
from shoal.node.executors.taskuser import TaskUsers
from shoal.v1 import task_pb2

__all__ = ["PythonExecutor"]

_log = logging.getLogger("shoal.node")


async def runs_python(users: TaskUsers) -> bool:
    """Whether the task user can run this interpreter."""
    async with users.lease(None) as leased:
        assert leased is not None
        user, home = leased.user, leased.home
        try:
            proc = await asyncio.create_subprocess_exec(
                *user.argv([sys.executable, "-I", "-c", ""]),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                cwd=home,
            )
        except OSError:
            return False
        return await proc.wait() == 0


@register
class PythonExecutor(Executor):
    name = "python"

    def __init__(self, settings: NodeSettings) -> None:
        super().__init__(settings)
        self.users = TaskUsers(settings.run_as)

    async def async_available(self) -> bool:
        """Whether the task user can run this interpreter (not when it lives in a directory only
        root may enter, such as /root/.pyenv). Under run_as = "auto" python tasks then run as
        the node's user, said at start; a user named in run_as is not given up: python is not
        offered. Not offered by the one-file executable, which holds no interpreter to run."""
        if getattr(sys, "frozen", False):
            _log.warning("python not offered: this shoal is one executable, with no Python")
            return False
        if not self.users.switching or await runs_python(self.users):
            return True
        if self.users.auto:
            _log.warning(
                "python tasks run as the node's own user: other users cannot run %s (install"
                ' Python where they can, or set run_as = "node" to choose this)',
                sys.executable,
            )
            self.users.give_up()
            return True
        _log.error("python not offered: the run_as user cannot run %s", sys.executable)
        return False

    async def run(self, spec: task_pb2.TaskSpec, ctx: ExecutionContext) -> Outcome:
        py = spec.python
        argv = [sys.executable, "-I", "-c", py.code, *py.args]
        return await run_process(
            argv, ctx, env=py.env, cwd=py.cwd, stdin=py.stdin, users=self.users
        )
