"""The `ollama` and `llm` executors against stand-ins of each API (real HTTP on loopback, the
official clients), called as a node calls them: tokens stream in order as they come, usage is
reported, failures say whose they are, and a cancel ends the request at once.

The Ollama tests that need no switch of the stand-in run against a real Ollama server instead
when SHOAL_TEST_OLLAMA_URL (and SHOAL_TEST_OLLAMA_MODEL) are set.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import SecretStr

from shoal import llm, ollama
from shoal.config import NodeSettings
from shoal.node.executors.base import ExecutionContext, Executor, Outcome
from shoal.node.executors.llm import _CLOUD, LlmExecutor
from shoal.node.executors.ollama import OllamaExecutor
from shoal.node.executors.process import NODE_ONLY_VARIABLES, run_process
from shoal.v1 import task_pb2
from tests.integration.harness import eventually
from tests.standins import (
    TOKENS,
    AnthropicStandIn,
    GeminiStandIn,
    ModelStandIn,
    OllamaStandIn,
    OllamaTarget,
    OpenAIStandIn,
    ollama_target,
)

pytestmark = pytest.mark.timeout(30)

DEADLINE = 10.0  # seconds anything awaited here may take
KEY = "sk-standin-key"
CLOUD = ("openai", "anthropic", "gemini")
KEY_VARIABLES = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY")


@pytest.fixture(autouse=True, scope="module")
def _sdks_imported() -> None:
    """The providers' SDKs, imported before any run is timed: the executor imports each on
    first use, which takes seconds on a busy machine and is not what these tests time."""
    for module in ("openai", "anthropic", "google.genai"):
        importlib.import_module(module)


class Output:
    """What a run emitted; `first` is set by its first chunk."""

    def __init__(self) -> None:
        self.chunks: list[task_pb2.OutputChunk] = []
        self.first = asyncio.Event()

    def emit(self, chunk: task_pb2.OutputChunk) -> None:
        self.chunks.append(chunk)
        self.first.set()

    @property
    def tokens(self) -> list[str]:
        assert {c.stream for c in self.chunks} <= {task_pb2.OUTPUT_STREAM_STDOUT}
        return [c.data for c in self.chunks]

    def ctx(self, tail: int = 64 << 10) -> ExecutionContext:
        return ExecutionContext("task-1", self.emit, tail)


def text_of(outcome: Outcome) -> str:
    return str(outcome.result.output["text"])


async def run(executor: Executor, spec: task_pb2.TaskSpec, out: Output | None = None) -> Outcome:
    return await asyncio.wait_for(executor.run(spec, (out or Output()).ctx()), DEADLINE)


async def cancel_mid_stream(
    executor: Executor, spec: task_pb2.TaskSpec, standin: ModelStandIn | None
) -> Output:
    """Start a run, cancel it once its first token came (the stand-in holds the last one):
    the run ends with CancelledError at once, and the stand-in sees its client go away."""
    if standin is not None:
        standin.hold = asyncio.Event()  # never set: the answer cannot end by itself
    out = Output()
    task = asyncio.create_task(executor.run(spec, out.ctx()))
    await asyncio.wait_for(out.first.wait(), DEADLINE)
    if standin is not None:  # all but the held token came

        def all_but_the_last() -> None:
            assert len(out.chunks) == len(TOKENS) - 1

        await eventually(all_but_the_last, timeout=DEADLINE)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, DEADLINE)
    if standin is not None:
        await asyncio.wait_for(standin.abandoned.wait(), DEADLINE)
        assert out.tokens == list(TOKENS[:-1])  # and the last never came
    return out


# -- ollama --------------------------------------------------------------------------------


@pytest.fixture
async def target() -> AsyncIterator[OllamaTarget]:
    """The Ollama stand-in, or the real server SHOAL_TEST_OLLAMA_URL names."""
    async with ollama_target() as t:
        yield t


@contextlib.asynccontextmanager
async def ollama_executor(url: str) -> AsyncIterator[OllamaExecutor]:
    executor = OllamaExecutor(NodeSettings(ollama_host=url))
    try:
        yield executor
    finally:
        await executor.aclose()


# Real models answer at length: a few tokens are enough.
SHORT = {"num_predict": 8}


async def test_ollama_chat_streams_tokens_in_order_and_reports_usage(
    target: OllamaTarget,
) -> None:
    spec = ollama(
        target.model,
        messages=[{"role": "user", "content": "Say hello."}],
        system="Be brief.",
        options=SHORT,
    )
    out = Output()
    async with ollama_executor(target.url) as executor:
        outcome = await run(executor, spec, out)
    result = outcome.result
    assert outcome.state == task_pb2.TASK_STATE_SUCCEEDED, result.error
    assert "".join(out.tokens) == text_of(outcome) == result.stdout
    assert result.output["done_reason"] in ("stop", "length")
    assert result.usage.model == target.model and result.usage.cost == 0
    assert result.usage.prompt_tokens > 0 and result.usage.completion_tokens > 0
    if target.standin is not None:
        assert out.tokens == list(TOKENS)  # one chunk per token, in order
        assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (7, len(TOKENS))
        sent = target.standin.requests[-1]
        assert sent.path == "/api/chat"
        assert sent.json()["messages"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hello."},
        ]


async def test_ollama_generate_passes_system_options_and_format(target: OllamaTarget) -> None:
    spec = ollama(
        target.model,
        prompt="Answer with a JSON object.",
        system="You answer in JSON.",
        options={**SHORT, "temperature": 0.5},
        format="json",
    )
    out = Output()
    async with ollama_executor(target.url) as executor:
        outcome = await run(executor, spec, out)
    assert outcome.state == task_pb2.TASK_STATE_SUCCEEDED, outcome.result.error
    assert "".join(out.tokens) == text_of(outcome)
    if target.standin is not None:
        sent = target.standin.requests[-1].json()
        assert target.standin.requests[-1].path == "/api/generate"
        assert sent["system"] == "You answer in JSON." and sent["format"] == "json"
        # Integral numbers go as integers, as Ollama's integer options want them.
        assert sent["options"] == {"num_predict": 8, "temperature": 0.5}
        assert isinstance(sent["options"]["num_predict"], int)


async def test_the_stdout_tail_is_capped_and_the_output_keeps_the_whole_text() -> None:
    async with OllamaStandIn() as standin, ollama_executor(standin.url) as executor:
        out = Output()
        outcome = await asyncio.wait_for(
            executor.run(ollama("tiny", prompt="hi"), out.ctx(tail=5)), DEADLINE
        )
    assert text_of(outcome) == "Hello, shoal!" and outcome.result.stdout == "hoal!"


async def test_an_unknown_ollama_model_fails_the_task(target: OllamaTarget) -> None:
    async with ollama_executor(target.url) as executor:
        outcome = await run(executor, ollama("shoal-no-such-model", prompt="hi"))
    result = outcome.result
    assert outcome.state == task_pb2.TASK_STATE_FAILED
    assert not result.infrastructure_failure
    assert "'shoal-no-such-model' not found" in result.error and "404" in result.error


async def test_a_schema_that_is_not_json_fails_the_task_before_any_call() -> None:
    async with OllamaStandIn() as standin, ollama_executor(standin.url) as executor:
        outcome = await run(executor, ollama("tiny", prompt="hi", format="{not json"))
    assert outcome.state == task_pb2.TASK_STATE_FAILED
    assert not outcome.result.infrastructure_failure and "JSON schema" in outcome.result.error
    assert standin.requests == []


@pytest.mark.parametrize("status", [500, 503])
async def test_an_ollama_server_error_is_an_infrastructure_failure(status: int) -> None:
    async with OllamaStandIn() as standin, ollama_executor(standin.url) as executor:
        standin.status = status
        outcome = await run(executor, ollama("tiny", prompt="hi"))
    assert outcome.state == task_pb2.TASK_STATE_FAILED
    assert outcome.result.infrastructure_failure
    assert f"HTTP {status}" in outcome.result.error and standin.url in outcome.result.error


async def test_an_ollama_server_that_went_away_is_an_infrastructure_failure() -> None:
    async with OllamaStandIn() as standin, ollama_executor(standin.url) as executor:
        assert await executor.async_available()
        await standin.go_away()
        outcome = await run(executor, ollama("tiny", prompt="hi"))
        assert outcome.state == task_pb2.TASK_STATE_FAILED
        assert outcome.result.infrastructure_failure
        assert "connection failed" in outcome.result.error
        assert not await executor.async_available()
        assert await executor.models() == [] and await executor.loaded_models() == []


async def test_ollama_lists_its_models_and_those_loaded(target: OllamaTarget) -> None:
    async with ollama_executor(target.url) as executor:
        assert await executor.async_available()
        assert target.model in await executor.models()
        if target.standin is not None:
            assert await executor.loaded_models() == []
        outcome = await run(executor, ollama(target.model, prompt="hi", options=SHORT))
        assert outcome.state == task_pb2.TASK_STATE_SUCCEEDED, outcome.result.error
        assert target.model in await executor.loaded_models()


async def test_cancelling_an_ollama_run_closes_its_request_at_once(target: OllamaTarget) -> None:
    spec = ollama(target.model, prompt="Count from one to one hundred, in words.")
    async with ollama_executor(target.url) as executor:
        await cancel_mid_stream(executor, spec, target.standin)


# -- llm -----------------------------------------------------------------------------------

STANDINS: dict[str, type[ModelStandIn]] = {
    "openai": OpenAIStandIn,
    "anthropic": AnthropicStandIn,
    "gemini": GeminiStandIn,
}


def cloud_settings(provider: str, url: str, key: str = KEY) -> dict[str, Any]:
    base = f"{url}/v1" if provider == "openai" else url  # OpenAI's base URL includes /v1
    return {f"llm_{provider}_api_key": key, f"llm_{provider}_base_url": base}


@contextlib.asynccontextmanager
async def cloud(provider: str, **settings: Any) -> AsyncIterator[tuple[ModelStandIn, LlmExecutor]]:
    """A provider's stand-in (expecting KEY) and an llm executor configured for it."""
    standin = STANDINS[provider](api_key=KEY)
    await standin.start()
    executor = LlmExecutor(NodeSettings(**{**cloud_settings(provider, standin.url), **settings}))
    try:
        yield standin, executor
    finally:
        await executor.aclose()
        await standin.aclose()


@pytest.fixture(autouse=True)
def _no_provider_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the keys a test configures reach the executors, not the machine's."""
    for name in (*KEY_VARIABLES, "OLLAMA_HOST"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("provider", CLOUD)
async def test_llm_streams_tokens_in_order_and_reports_usage(provider: str) -> None:
    spec = llm(
        provider,
        "tiny",
        messages=[{"role": "user", "content": "Say hello."}],
        system="Be brief.",
        max_tokens=64,
    )
    out = Output()
    async with cloud(provider) as (standin, executor):
        outcome = await run(executor, spec, out)
    result = outcome.result
    assert outcome.state == task_pb2.TASK_STATE_SUCCEEDED, result.error
    assert out.tokens == list(TOKENS)
    assert text_of(outcome) == result.stdout == standin.text
    assert result.output["provider"] == provider
    assert result.output["finish_reason"] in ("stop", "end_turn", "STOP")
    assert str(result.output["model"]).startswith("tiny")  # as the provider names it
    usage = result.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.model) == (7, len(TOKENS), "tiny")
    (sent,) = standin.requests  # one call, and the system prompt and limit went with it
    assert "Be brief." in sent.body.decode() and b"64" in sent.body


@pytest.mark.parametrize(
    ("provider", "status"),
    [
        ("openai", 429),
        ("openai", 500),
        ("anthropic", 429),
        ("anthropic", 529),
        ("gemini", 429),
        ("gemini", 503),
    ],
)
async def test_rate_limits_and_provider_errors_are_infrastructure_failures(
    provider: str, status: int
) -> None:
    async with cloud(provider) as (standin, executor):
        standin.status = status
        outcome = await run(executor, llm(provider, "tiny", prompt="hi"))
    result = outcome.result
    assert outcome.state == task_pb2.TASK_STATE_FAILED
    assert result.infrastructure_failure
    assert result.error.startswith(f"{provider}: HTTP {status}"), result.error
    assert len(standin.requests) == 1  # the SDK did not retry: Shoal does


@pytest.mark.parametrize("provider", CLOUD)
async def test_an_unknown_model_fails_the_task(provider: str) -> None:
    async with cloud(provider) as (_, executor):
        outcome = await run(executor, llm(provider, "no-such-model", prompt="hi"))
    assert outcome.state == task_pb2.TASK_STATE_FAILED
    assert not outcome.result.infrastructure_failure
    assert outcome.result.error.startswith(f"{provider}: HTTP 404")
    assert "no-such-model" in outcome.result.error


@pytest.mark.parametrize("provider", CLOUD)
async def test_a_key_the_provider_refuses_is_the_nodes_failure(provider: str) -> None:
    async with cloud(provider) as (standin, _):
        settings = NodeSettings(**cloud_settings(provider, standin.url, key="sk-wrong"))
        executor = LlmExecutor(settings)
        try:
            outcome = await run(executor, llm(provider, "tiny", prompt="hi"))
        finally:
            await executor.aclose()
    assert outcome.state == task_pb2.TASK_STATE_FAILED
    assert outcome.result.infrastructure_failure  # another node may hold a valid key
    assert outcome.result.error.startswith(f"{provider}: HTTP 401")
    assert "sk-wrong" not in outcome.result.error


@pytest.mark.parametrize("provider", CLOUD)
async def test_an_unreachable_provider_is_an_infrastructure_failure(provider: str) -> None:
    async with cloud(provider) as (standin, executor):
        await standin.go_away()
        outcome = await run(executor, llm(provider, "tiny", prompt="hi"))
    assert outcome.state == task_pb2.TASK_STATE_FAILED
    assert outcome.result.infrastructure_failure
    assert outcome.result.error.startswith(f"{provider}: ")


@pytest.mark.parametrize("provider", CLOUD)
async def test_cancelling_an_llm_run_closes_its_request_at_once(provider: str) -> None:
    async with cloud(provider) as (standin, executor):
        await cancel_mid_stream(executor, llm(provider, "tiny", prompt="hi"), standin)


async def test_an_llm_task_for_ollama_runs_on_the_nodes_ollama_server() -> None:
    async with OllamaStandIn() as standin:
        executor = LlmExecutor(NodeSettings(ollama_host=standin.url))
        try:
            assert executor.configured() == []
            assert await executor.async_available()  # Ollama answers: llm tasks can go there
            out = Output()
            spec = llm("ollama", "tiny", prompt="hi", system="Be brief.", max_tokens=16)
            outcome = await run(executor, spec, out)
            assert outcome.state == task_pb2.TASK_STATE_SUCCEEDED, outcome.result.error
            assert out.tokens == list(TOKENS)
            output = outcome.result.output
            assert (output["provider"], output["finish_reason"]) == ("ollama", "stop")
            assert outcome.result.usage.completion_tokens == len(TOKENS)
            sent = standin.requests[-1].json()
            assert sent["system"] == "Be brief." and sent["options"] == {"num_predict": 16}

            await cancel_mid_stream(executor, spec, standin)
            await standin.go_away()
            assert not await executor.async_available()  # no key, no Ollama: nothing to offer
        finally:
            await executor.aclose()


async def test_providers_are_configured_by_the_nodes_settings_or_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert LlmExecutor(NodeSettings()).configured() == []
    settings = NodeSettings(llm_anthropic_api_key=SecretStr("sk-from-settings"))
    assert "sk-from-settings" not in repr(settings) + str(settings.model_dump())
    assert LlmExecutor(settings).configured() == ["anthropic"]
    monkeypatch.setenv("GOOGLE_API_KEY", "from-the-environment")
    monkeypatch.setenv("OPENAI_API_KEY", "from-the-environment")
    executor = LlmExecutor(settings)
    assert executor.configured() == ["openai", "anthropic", "gemini"]
    assert executor.available()


async def test_a_provider_this_node_cannot_call_is_its_failure_and_an_unknown_one_the_tasks() -> (
    None
):
    executor = LlmExecutor(NodeSettings())
    outcome = await run(executor, llm("openai", "gpt-4o", prompt="hi"))
    assert outcome.result.infrastructure_failure and "no API key for openai" in outcome.result.error
    outcome = await run(executor, llm("acme", "x", prompt="hi"))
    assert outcome.state == task_pb2.TASK_STATE_FAILED
    assert not outcome.result.infrastructure_failure and "unknown provider" in outcome.result.error


async def test_without_a_provider_the_first_route_this_node_serves_runs() -> None:
    async with cloud("anthropic") as (standin, executor):
        spec = llm("", "", prompt="hi", routes=[("openai", "gpt-4o"), ("anthropic", "tiny")])
        outcome = await run(executor, spec)
    assert outcome.state == task_pb2.TASK_STATE_SUCCEEDED, outcome.result.error
    assert outcome.result.output["provider"] == "anthropic"
    assert outcome.result.usage.model == "tiny" and len(standin.requests) == 1


def test_builders_place_by_model_and_break_by_backend() -> None:
    spec = llm("openai", "gpt-4o", prompt="hi", routes=[("anthropic", "claude")])
    assert (spec.model, spec.backend, spec.llm.routes[0].model) == ("gpt-4o", "openai", "claude")
    spec = ollama("llama3", messages=[{"role": "user", "content": "hi"}], options={"seed": 1})
    assert (spec.model, spec.backend, spec.ollama.messages[0].content) == ("llama3", "ollama", "hi")
    assert spec.ollama.options["seed"] == 1
    assert ollama("llama3", backend="gpu-box").backend == "gpu-box"


def test_no_provider_key_reaches_a_process_task() -> None:
    assert {v for provider in _CLOUD.values() for v in provider.env} <= NODE_ONLY_VARIABLES


async def test_a_shell_task_does_not_see_the_nodes_provider_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-of-the-node")
    chunks: list[task_pb2.OutputChunk] = []
    outcome = await run_process(
        ["sh", "-c", "echo ${OPENAI_API_KEY:-none}"], ExecutionContext("t", chunks.append, 1024)
    )
    assert outcome.result.stdout == "none\n"
