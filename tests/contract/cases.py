"""How to put each executor through the contract test: one ExecutorCase per executor name.

To add an executor, add its case to CASES (and take its name out of PENDING): specs built from
the CaseEnv the test provides, the NodeSettings fields it needs, and what to check is gone
after a run was stopped.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker as docker_sdk

from shoal import docker, llm, noop, ollama, python, shell, tool
from shoal.v1 import task_pb2
from tests.integration import functions_module
from tests.integration.docker_engine import IMAGE
from tests.integration.harness import eventually
from tests.standins import HttpStandIn, OllamaStandIn, OpenAIStandIn

from .loopback import LoopbackHttp

__all__ = ["CASES", "PENDING", "CaseEnv", "ExecutorCase", "Said"]

PENDING: set[str] = set()
"""Executors whose cases their authors add next: the completeness test tolerates them until
then (and fails once a case exists and the name is still here)."""

MODEL = "tiny"  # answers at once
MODEL_ENDLESS = "endless"  # its last token never comes
MODEL_FAILING = "failing"  # its server answers 503


@dataclass(frozen=True)
class CaseEnv:
    """What the cases' specs may use, made fresh for each test."""

    tmp: Path  # a directory of the test's own
    http: LoopbackHttp  # a real HTTP server on loopback, started
    refused_port: int  # a loopback port nothing listens on
    ollama: OllamaStandIn  # serving MODEL, MODEL_ENDLESS and MODEL_FAILING
    openai: OpenAIStandIn  # the same models, key "sk-contract"


@dataclass(frozen=True)
class Said:
    """A spec and text its output includes ('' for an executor with no output: `silent`)."""

    spec: task_pb2.TaskSpec
    says: str = ""


def _nothing(env: CaseEnv) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class ExecutorCase:
    """How to build, for one executor, the specs every check of the contract runs."""

    streams: Callable[[CaseEnv], Said]  # succeeds, its output including `says`
    runs_long: Callable[[CaseEnv], Said]  # runs until stopped, saying `says` first
    fails: Callable[[CaseEnv], task_pb2.TaskSpec]  # a failure of the task itself
    # A failure of what the executor relies on (a backend, an engine); None: it has none.
    infrastructure_failure: Callable[[CaseEnv], task_pb2.TaskSpec] | None = None
    settings: Callable[[CaseEnv], dict[str, Any]] = _nothing  # NodeSettings fields it needs
    # Returns once what a stopped run of `runs_long` held outside this process is gone (its
    # processes are checked for every executor, through the context's process groups).
    released: Callable[[CaseEnv], Awaitable[None]] | None = None
    silent: bool = False  # it has no output to stream (its checks of output are not run)
    # Its processes are a warm pool that outlives each run (the function executor's workers):
    # a stopped run must give its process group back, and the worker is not expected gone.
    warm: bool = False


def _custom(executor: str, params: dict[str, Any]) -> task_pb2.TaskSpec:
    spec = task_pb2.TaskSpec(custom=task_pb2.CustomSpec(executor=executor))
    spec.custom.params.update(params)
    return spec


def _http(url: str, method: str = "GET") -> task_pb2.TaskSpec:
    return task_pb2.TaskSpec(http=task_pb2.HttpSpec(url=url, method=method))


def _closed(standin: Callable[[CaseEnv], HttpStandIn]) -> Callable[[CaseEnv], Awaitable[None]]:
    async def released(env: CaseEnv) -> None:
        async def closed() -> None:
            assert standin(env).connections == 0, "a connection to the model API is open"

        await eventually(closed, timeout=5)

    return released


async def _container_removed(env: CaseEnv) -> None:
    client = docker_sdk.from_env()
    try:

        def removed() -> None:
            left = client.containers.list(all=True, filters={"label": "shoal.task=contract"})
            assert not left, f"containers left: {[c.name for c in left]}"

        await eventually(removed, timeout=5)
    finally:
        client.close()


def _llm(model: str) -> task_pb2.TaskSpec:
    return llm("openai", model, prompt="hello")


async def _hold_released(env: CaseEnv) -> None:
    async def closed() -> None:
        assert env.http.holding == 0, "the /hold connection is still open"

    await eventually(closed, timeout=5)


CASES: dict[str, ExecutorCase] = {
    "noop": ExecutorCase(
        streams=lambda env: Said(noop({"echo": 1})),
        runs_long=lambda env: Said(noop({"sleep": 600})),
        fails=lambda env: noop({"usage": {"prompt_tokens": "many"}}),
        silent=True,
    ),
    "shell": ExecutorCase(
        streams=lambda env: Said(shell("echo one; echo two >&2"), "one"),
        runs_long=lambda env: Said(shell("echo started; sleep 600 & wait"), "started"),
        fails=lambda env: shell("echo bad >&2; exit 3"),
    ),
    "python": ExecutorCase(
        streams=lambda env: Said(python("print('from python', flush=True)"), "from python"),
        runs_long=lambda env: Said(
            python("import signal\nprint('started', flush=True)\nsignal.pause()"), "started"
        ),
        fails=lambda env: python("raise SystemExit(4)"),
    ),
    "http": ExecutorCase(
        streams=lambda env: Said(_http(env.http.url("/text")), "hello from the loopback"),
        runs_long=lambda env: Said(_http(env.http.url("/hold")), "holding"),
        fails=lambda env: _http(env.http.url("/status/404")),
        infrastructure_failure=lambda env: _http(f"http://127.0.0.1:{env.refused_port}/"),
        settings=lambda env: {"http_allow_hosts": ["127.0.0.1"]},
        released=_hold_released,
    ),
    "tool": ExecutorCase(
        streams=lambda env: Said(tool("slugify", {"text": "Hello, World!"})),
        runs_long=lambda env: Said(tool("sleep", {"seconds": 600})),
        fails=lambda env: tool("slugify", {"text": 3}),
        silent=True,
    ),
    "function": ExecutorCase(
        streams=lambda env: Said(functions_module.greet.spec("contract"), "greeting contract"),
        runs_long=lambda env: Said(functions_module.started_then_wait.spec(600), "started"),
        fails=lambda env: functions_module.fail.spec("on purpose"),
        settings=lambda env: {"imports": [functions_module.__name__]},
        warm=True,
    ),
    "docker": ExecutorCase(
        streams=lambda env: Said(docker(IMAGE, ["echo", "from a container"]), "from a container"),
        runs_long=lambda env: Said(
            docker(IMAGE, ["sh", "-c", "echo started; exec sleep 600"]), "started"
        ),
        fails=lambda env: docker(IMAGE, ["sh", "-c", "exit 3"]),
        # Its engine is the infrastructure: test_docker.py stops it answering.
        released=_container_removed,
    ),
    "ollama": ExecutorCase(
        streams=lambda env: Said(ollama(MODEL, prompt="hello"), "Hello"),
        runs_long=lambda env: Said(ollama(MODEL_ENDLESS, prompt="hello"), "Hello"),
        fails=lambda env: ollama("no-such-model", prompt="hello"),
        infrastructure_failure=lambda env: ollama(MODEL_FAILING, prompt="hello"),
        settings=lambda env: {"ollama_host": env.ollama.url},
        released=_closed(lambda env: env.ollama),
    ),
    "llm": ExecutorCase(
        streams=lambda env: Said(_llm(MODEL), "Hello"),
        runs_long=lambda env: Said(_llm(MODEL_ENDLESS), "Hello"),
        fails=lambda env: _llm("no-such-model"),
        infrastructure_failure=lambda env: _llm(MODEL_FAILING),
        settings=lambda env: {
            "llm_openai_api_key": "sk-contract",
            "llm_openai_base_url": f"{env.openai.url}/v1",
        },
        released=_closed(lambda env: env.openai),
    ),
    # The example package's executor (examples/shoal-example), found by its entry point.
    "wordcount": ExecutorCase(
        streams=lambda env: Said(
            _custom("wordcount", {"text": "the quick brown fox\njumps over the lazy dog"}),
            "9 words in 2 lines",
        ),
        runs_long=lambda env: Said(
            _custom("wordcount", {"text": "one line\n" * 100, "pace": 60}), "line 1/100"
        ),
        fails=lambda env: _custom("wordcount", {"text": 42}),
    ),
}
