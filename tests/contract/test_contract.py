"""The executor contract, run over every executor's case (cases.py): output streams while it
runs, a cancel ends a run promptly and leaves nothing behind, the node's timeout ends it, and
failures say whose they are (the task's, or the infrastructure's)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import psutil
import pytest

from shoal.config import NodeSettings
from shoal.node.agent import NodeAgent
from shoal.node.executors.base import (
    _REGISTRY,
    ExecutionContext,
    Executor,
    Outcome,
    available_executors,
)
from shoal.node.executors.groups import ProcessGroups
from shoal.v1 import task_pb2
from tests.integration.docker_engine import DockerEngine
from tests.integration.harness import eventually, free_port
from tests.standins import OllamaStandIn, OpenAIStandIn

from .cases import (
    CASES,
    MODEL,
    MODEL_ENDLESS,
    MODEL_FAILING,
    PENDING,
    CaseEnv,
    ExecutorCase,
)
from .loopback import LoopbackHttp

NAMES = sorted(CASES)
SPEAKING = [name for name in NAMES if not CASES[name].silent]
FAILING = [name for name in NAMES if CASES[name].infrastructure_failure is not None]
PROMPT = 5.0  # seconds a run may take to end once stopped (and a short run, to end at all)
TIMEOUT = timedelta(milliseconds=300)  # the execution timeout the timeout check gives


@pytest.fixture
async def env(
    tmp_path: Path, docker_engine: DockerEngine, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[CaseEnv]:
    if docker_engine.host is not None:
        monkeypatch.setenv("DOCKER_HOST", docker_engine.host)
    models = [MODEL, MODEL_ENDLESS, MODEL_FAILING]
    async with contextlib.AsyncExitStack() as stack:
        server = await stack.enter_async_context(LoopbackHttp())
        standins = (
            OllamaStandIn(models=models),
            OpenAIStandIn(models=models, api_key="sk-contract"),
        )
        for standin in standins:
            await stack.enter_async_context(standin)
            standin.endless.add(MODEL_ENDLESS)
            standin.failing.add(MODEL_FAILING)
        yield CaseEnv(tmp_path, server, free_port(), *standins)


@contextlib.asynccontextmanager
async def _executor(name: str, env: CaseEnv) -> AsyncIterator[Executor]:
    """The executor as a node builds it (from the registry and entry points), then closed."""
    executors = available_executors(NodeSettings(executors=[name], **CASES[name].settings(env)))
    assert name in executors, f"executor {name} is not available on this machine"
    executor = executors[name]
    assert await executor.async_available(), f"executor {name} says it cannot run now"
    try:
        yield executor
    finally:
        await executor.aclose()


class _SeenGroups(ProcessGroups):
    """Process groups that remember every group ever added."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[int] = set()

    def add(self, pgid: int) -> None:
        self.seen.add(pgid)
        super().add(pgid)


class _Recorder:
    """An ExecutionContext whose output and process groups the test can see."""

    def __init__(self, env: CaseEnv, says: str = "") -> None:
        self.chunks: list[task_pb2.OutputChunk] = []
        self.says = says
        self.heard = asyncio.Event()  # set once the output includes `says`
        self.groups = _SeenGroups()
        self.leaders = self.groups.seen  # every process group the run registered
        self.ctx = ExecutionContext(
            "contract", self._emit, 64 << 10, workdir=env.tmp, groups=self.groups
        )

    def _emit(self, chunk: task_pb2.OutputChunk) -> None:
        self.chunks.append(chunk)
        if self.says and self.says in self.text():
            self.heard.set()

    def text(self) -> str:
        return "".join(c.data for c in self.chunks)


async def _run(executor: Executor, spec: task_pb2.TaskSpec, env: CaseEnv) -> Outcome:
    async with asyncio.timeout(PROMPT):
        return await executor.run(spec, _Recorder(env).ctx)


def _group_gone(pgid: int) -> None:
    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                raise AssertionError(f"process {proc.pid} of group {pgid} still runs")


async def _left_nothing(case: ExecutorCase, env: CaseEnv, recorder: _Recorder) -> None:
    """What a stopped run started is gone: its processes, and what its case names."""
    assert not len(recorder.groups), "a process group is still registered"
    leaders = () if case.warm else recorder.leaders

    def groups_gone() -> None:
        for pgid in leaders:
            _group_gone(pgid)

    await eventually(groups_gone, timeout=PROMPT)
    if case.released is not None:
        await case.released(env)


def test_every_registered_executor_has_a_case() -> None:
    available_executors(NodeSettings(executors=["noop"]))  # registers built-ins, entry points
    assert not set(_REGISTRY) - set(CASES) - PENDING, "executors without a contract case"
    assert not PENDING & set(CASES), "these have a case now: take them out of PENDING"


@pytest.mark.parametrize("name", NAMES)
async def test_a_run_succeeds_with_its_output(name: str, env: CaseEnv) -> None:
    said = CASES[name].streams(env)
    recorder = _Recorder(env)
    async with _executor(name, env) as executor, asyncio.timeout(PROMPT):
        outcome = await executor.run(said.spec, recorder.ctx)
    assert outcome.state == task_pb2.TASK_STATE_SUCCEEDED, outcome.result
    assert not outcome.result.infrastructure_failure
    assert said.says in recorder.text()
    assert not len(recorder.groups)


@pytest.mark.parametrize("name", SPEAKING)
async def test_output_streams_before_the_end(name: str, env: CaseEnv) -> None:
    said = CASES[name].runs_long(env)
    assert said.says, "a case that is not silent says what its long run says first"
    recorder = _Recorder(env, said.says)
    async with _executor(name, env) as executor:
        run = asyncio.create_task(executor.run(said.spec, recorder.ctx))
        try:
            await asyncio.wait_for(recorder.heard.wait(), PROMPT)
            assert not run.done(), "it ended before the test let it"
        finally:
            run.cancel()
            await asyncio.wait({run}, timeout=PROMPT)


@pytest.mark.parametrize("name", NAMES)
async def test_cancel_ends_it_promptly_and_cleans_up(name: str, env: CaseEnv) -> None:
    case = CASES[name]
    said = case.runs_long(env)
    recorder = _Recorder(env, said.says)
    before = asyncio.all_tasks()
    async with _executor(name, env) as executor:
        run = asyncio.create_task(executor.run(said.spec, recorder.ctx))
        if said.says:
            await asyncio.wait_for(recorder.heard.wait(), PROMPT)
        else:
            for _ in range(20):  # loop turns, not time: let it get going
                await asyncio.sleep(0)
        assert not run.done(), f"it ended by itself: {run.result() if run.done() else ''}"
        run.cancel()
        await asyncio.wait({run}, timeout=PROMPT)
        assert run.done(), f"still running {PROMPT} s after it was cancelled"
        assert run.cancelled(), "its run swallowed the cancel instead of raising CancelledError"
        await _left_nothing(case, env, recorder)
    this = asyncio.current_task()

    def no_tasks_left() -> None:
        left = [t for t in asyncio.all_tasks() - before if t is not this and not t.done()]
        assert not left, f"tasks left running: {left}"

    await eventually(no_tasks_left, timeout=PROMPT)


@pytest.mark.parametrize("name", NAMES)
async def test_the_nodes_timeout_ends_it(name: str, env: CaseEnv) -> None:
    case = CASES[name]
    spec = task_pb2.TaskSpec()
    spec.CopyFrom(case.runs_long(env).spec)
    spec.timeout.FromTimedelta(TIMEOUT)
    async with _executor(name, env) as executor:
        settings = NodeSettings(standalone=True, slots=1, workdir=env.tmp, **case.settings(env))
        node = NodeAgent(settings, executors={name: executor})
        try:
            task = node.execute(spec)
            await asyncio.wait_for(task.ended.wait(), TIMEOUT.total_seconds() + PROMPT)
        finally:
            await node.stop()
    assert task.state == task_pb2.TASK_STATE_TIMED_OUT, task.result
    if case.released is not None:
        await case.released(env)


@pytest.mark.parametrize("name", NAMES)
async def test_a_failure_of_the_task_is_not_the_infrastructures(name: str, env: CaseEnv) -> None:
    async with _executor(name, env) as executor:
        outcome = await _run(executor, CASES[name].fails(env), env)
    assert outcome.state == task_pb2.TASK_STATE_FAILED, outcome.result
    assert not outcome.result.infrastructure_failure, outcome.result
    assert outcome.result.error or outcome.result.exit_code, "a failure says why"


@pytest.mark.parametrize("name", FAILING)
async def test_an_infrastructure_failure_says_so(name: str, env: CaseEnv) -> None:
    make = CASES[name].infrastructure_failure
    assert make is not None
    async with _executor(name, env) as executor:
        outcome = await _run(executor, make(env), env)
    assert outcome.state == task_pb2.TASK_STATE_FAILED, outcome.result
    assert outcome.result.infrastructure_failure, outcome.result
    assert outcome.result.error
