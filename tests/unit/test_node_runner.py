"""The node's shape: a grpc-free runner under the process, and executors that say what they
offer through their hooks rather than being recognised by their class; what a run says of its
progress, sampled."""

from __future__ import annotations

import ast
import asyncio
import inspect
from pathlib import Path
from types import ModuleType

import pytest

from shoal.config import NodeSettings
from shoal.node import agent as agent_module
from shoal.node import report as report_module
from shoal.node import runner as runner_module
from shoal.node.agent import NodeAgent
from shoal.node.executors.base import ExecutionContext, Executor, Outcome
from shoal.v1 import node_pb2, task_pb2

pytestmark = pytest.mark.timeout(30)


def _imports(module: ModuleType) -> set[str]:
    tree = ast.parse(inspect.getsource(module))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    return imported


@pytest.mark.parametrize("module", [runner_module, report_module])
def test_the_runner_is_transport_free(module: ModuleType) -> None:
    imported = _imports(module)
    assert not {m for m in imported if m == "grpc" or m.startswith(("grpc.", "grpc_"))}
    assert not any(m.endswith("_grpc") for m in imported)


def test_the_process_knows_executors_by_their_contract_only() -> None:
    executors = {m for m in _imports(agent_module) if m.startswith("shoal.node.executors.")}
    assert executors <= {"shoal.node.executors.base"}, executors


class _Offering(Executor):
    """Offers a tool and a provider, and says in heartbeats which model it holds."""

    name = "offering"

    def offers(self, info: node_pb2.NodeInfo) -> None:
        info.tools.append("lookup")
        info.llm_providers.append("acme")

    def offers_now(self, heartbeat: node_pb2.Heartbeat) -> None:
        heartbeat.loaded_models.append("tiny")

    async def run(self, spec: task_pb2.TaskSpec, ctx: ExecutionContext) -> Outcome:
        return Outcome(task_pb2.TASK_STATE_SUCCEEDED, task_pb2.TaskResult())


def test_what_an_executor_offers_is_in_the_nodes_info_and_heartbeats(tmp_path: Path) -> None:
    settings = NodeSettings(standalone=True, guard=False, workdir=tmp_path)
    node = NodeAgent(settings, executors={"offering": _Offering(settings)})
    info = node.info()
    assert list(info.executors) == ["offering"]
    assert list(info.tools) == ["lookup"]
    assert list(info.llm_providers) == ["acme"]
    assert list(node.heartbeat().loaded_models) == ["tiny"]


async def test_a_task_stopped_in_the_turn_it_was_started_ends_and_gives_back_its_slot(
    tmp_path: Path,
) -> None:
    """Cancelled before its coroutine began, it would end without its `finally`: never
    reported, its slot never given back (a node's Execute and Cancel read in one turn)."""
    settings = NodeSettings(standalone=True, guard=False, workdir=tmp_path, slots=1)
    runner = NodeAgent(settings).runner
    started = runner.execute(task_pb2.TaskSpec(custom=task_pb2.CustomSpec(executor="noop")))
    runner.cancel_direct(started.id)
    await asyncio.wait_for(started.ended.wait(), 10)
    assert started.state == task_pb2.TASK_STATE_CANCELLED
    assert runner.slots.free == 1 and not runner.running and runner.idle.is_set()


class _Progress:
    """A RunReport that keeps the progress it is told."""

    def __init__(self) -> None:
        self.told: list[float] = []

    def progress(self, progress: task_pb2.Progress) -> None:
        self.told.append(progress.fraction)


def test_progress_is_sampled_and_done_is_told_once() -> None:
    report = _Progress()
    run = runner_module._Run("t", task_pb2.AttemptId(), report)  # type: ignore[arg-type]
    for i in range(1000):
        run.progress(i / 1000, "")
    run.progress(float("nan"), "")
    for _ in range(1000):  # a loop that says "done" over and over is told once
        run.progress(1.0, "")
    run.progress(5.0, "")  # clamped: done again
    assert report.told == [0.0, 1.0]
