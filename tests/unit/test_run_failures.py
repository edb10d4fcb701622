"""Whose fault a failed run is, as the node reports it: the task's (TaskError) or the
infrastructure's (InfrastructureError, or an executor's bug), for any executor."""

from __future__ import annotations

import asyncio
from typing import ClassVar

import pytest

from shoal.config import NodeSettings
from shoal.node.agent import NodeAgent
from shoal.node.executors.base import (
    ExecutionContext,
    Executor,
    InfrastructureError,
    Outcome,
    TaskError,
)
from shoal.node.executors.docker.engine import EngineError, is_task_error
from shoal.node.executors.process import run_process
from shoal.v1 import task_pb2

pytestmark = pytest.mark.timeout(30)

SECRET = "s3cret-value-1234"


class Raising(Executor):
    """A third-party executor that raises what its task's `raise` param names."""

    name: ClassVar[str] = "raising"

    async def run(self, spec: task_pb2.TaskSpec, ctx: ExecutionContext) -> Outcome:
        what = spec.custom.params["raise"]
        if what == "task":
            raise TaskError(f"no such thing as {ctx.secret_env.get('KEY', 'it')}", exit_code=2)
        if what == "infrastructure":
            raise InfrastructureError("the service behind it is down")
        raise RuntimeError("a bug")


async def _run(params: dict[str, str], *secrets: str) -> tuple[int, task_pb2.TaskResult]:
    settings = NodeSettings(standalone=True, slots=1, secrets={"key": SECRET})
    node = NodeAgent(settings, executors={"raising": Raising(settings)})
    spec = task_pb2.TaskSpec(custom=task_pb2.CustomSpec(executor="raising"))
    spec.custom.params.update(params)
    for name in secrets:
        spec.secrets.add(name=name, env="KEY")
    try:
        task = node.execute(spec)
        await asyncio.wait_for(task.ended.wait(), 10)
    finally:
        await node.stop()
    assert task.result is not None
    return task.state, task.result


async def test_a_task_error_is_the_tasks_failure_and_its_secrets_stay_hidden() -> None:
    state, result = await _run({"raise": "task"}, "key")
    assert state == task_pb2.TASK_STATE_FAILED
    assert not result.infrastructure_failure
    assert (result.exit_code, result.error) == (2, "no such thing as ***")


async def test_an_infrastructure_error_and_a_bug_are_the_infrastructures() -> None:
    down_state, down = await _run({"raise": "infrastructure"})
    bug_state, bug = await _run({"raise": "bug"})
    assert down_state == bug_state == task_pb2.TASK_STATE_FAILED
    assert down.error == "the service behind it is down"
    assert down.infrastructure_failure and bug.infrastructure_failure


async def test_a_secret_the_node_lacks_is_the_tasks_failure() -> None:
    state, result = await _run({"raise": "task"}, "absent")
    assert state == task_pb2.TASK_STATE_FAILED
    assert "secrets not configured on this node: 'absent'" in result.error
    assert not result.infrastructure_failure


@pytest.mark.parametrize(
    ("error", "tasks"),
    [
        ("manifest for x:1 not found: manifest unknown", True),
        ("pull access denied for x, repository does not exist or may require 'docker login'", True),
        ('Get "https://registry-1.docker.io/v2/": dial tcp: lookup registry: no such host', False),
        ("unexpected EOF", False),
    ],
)
def test_a_pull_that_finds_no_such_image_is_the_tasks_failure(error: str, tasks: bool) -> None:
    assert is_task_error(EngineError(f"pulling x:1: {error}")) is tasks


async def test_a_command_no_process_can_start_with_is_the_tasks_failure() -> None:
    """A NUL in its command (a spec the coordinator's checks did not see) fails the task, not
    the node."""
    outcome = await run_process(["echo", "a\0b"], ExecutionContext("t", lambda chunk: None, 1024))
    assert outcome.state == task_pb2.TASK_STATE_FAILED
    assert outcome.result.exit_code == 127 and "null byte" in outcome.result.error
