"""`llm`: a call to a language model of OpenAI, Anthropic or Gemini (their official async SDKs,
the `llm` extra) or of the node's Ollama server, its tokens streamed as stdout as they come.

API keys and base URLs come from the node's settings (or the providers' usual environment
variables), never from a task. Each SDK is imported when a task first needs it, so a node
without the extra still starts. The SDKs' own retries are off: Shoal retries, and a rate limit,
an overloaded or unreachable provider is an infrastructure failure (which also feeds breakers).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from google.protobuf import struct_pb2

from shoal.config import NodeSettings
from shoal.node.executors.base import ExecutionContext, Executor, Outcome, register
from shoal.node.executors.ollama import ModelCallFailed, OllamaServer, Reply, closing, failed
from shoal.v1 import node_pb2, task_pb2

if TYPE_CHECKING:
    import anthropic
    import openai
    from anthropic.types import MessageParam
    from google import genai
    from openai.types.chat import ChatCompletionMessageParam

__all__ = ["LlmExecutor"]

# Anthropic requires a limit on the reply; this one when the task sets none.
DEFAULT_MAX_TOKENS = 4096


@dataclass(frozen=True)
class _Provider:
    sdk: str  # the SDK's import name
    env: tuple[str, ...]  # where its key is read when the node's settings hold none


_CLOUD = {
    "openai": _Provider("openai", ("OPENAI_API_KEY",)),
    "anthropic": _Provider("anthropic", ("ANTHROPIC_API_KEY",)),
    "gemini": _Provider("google.genai", ("GEMINI_API_KEY", "GOOGLE_API_KEY")),
}


@dataclass(frozen=True)
class _Call:
    """One call, whatever the provider: `messages` are (role, content), roles as the task gave
    them; system messages among them are the provider function's business."""

    provider: str
    model: str
    system: str
    messages: list[tuple[str, str]]
    max_tokens: int  # 0: the provider's default
    temperature: float | None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # its parent package is missing
        return False


def _status_failure(provider: str, status: int, detail: str) -> ModelCallFailed:
    """A provider's HTTP error, classified: the task's fault or the backend's."""
    if status < 400:
        # An error event after the provider accepted the call (HTTP 200): it broke off.
        return ModelCallFailed(f"{provider}: failed while streaming: {detail}", infrastructure=True)
    # 429 and 5xx (529: Anthropic overloaded) are the provider's state; 401 and 403 are the
    # node's key, not the task: another node may hold a valid one, so they count as
    # infrastructure too (retried elsewhere, breaker per node). Other 4xx are the task's.
    infrastructure = status in (401, 403, 408, 429) or status >= 500
    return ModelCallFailed(f"{provider}: HTTP {status}: {detail}", infrastructure=infrastructure)


def _detail(err: Exception) -> str:
    """The provider's own message of an SDK error, without the SDK's wrapping."""
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])
    message = getattr(err, "message", None)
    return message if isinstance(message, str) and message else str(err) or type(err).__name__


@register
class LlmExecutor(Executor):
    name = "llm"

    def __init__(self, settings: NodeSettings) -> None:
        super().__init__(settings)
        self.ollama = OllamaServer(settings)
        self._openai: openai.AsyncOpenAI | None = None
        self._anthropic: anthropic.AsyncAnthropic | None = None
        self._gemini: genai.Client | None = None
        self._closers: list[Callable[[], Awaitable[None]]] = []

    def _key(self, provider: str) -> str:
        """The node's API key for a cloud provider ('' when it has none)."""
        secret = getattr(self.settings, f"llm_{provider}_api_key")
        if secret is not None and secret.get_secret_value():
            return str(secret.get_secret_value())
        return next((os.environ[v] for v in _CLOUD[provider].env if os.environ.get(v)), "")

    def configured(self) -> list[str]:
        """The cloud providers this node can call: SDK installed and an API key set."""
        return [p for p, info in _CLOUD.items() if _installed(info.sdk) and self._key(p)]

    def offers(self, info: node_pb2.NodeInfo) -> None:
        info.llm_providers.extend(self.configured())

    def available(self) -> bool:
        # Ollama needs no key: its server is probed by async_available.
        return bool(self.configured()) or _installed("ollama")

    async def async_available(self) -> bool:
        return bool(self.configured()) or await self.ollama.answers()

    async def aclose(self) -> None:
        closers, self._closers = self._closers, []
        self._openai = self._anthropic = self._gemini = None
        for close in closers:
            await close()
        await self.ollama.aclose()

    def _route(self, spec: task_pb2.LlmSpec) -> tuple[str, str]:
        """(provider, model): the spec's own, else its first route this node can serve."""
        if spec.provider or not spec.routes:
            return spec.provider, spec.model
        here = {"ollama", *self.configured()}
        for route in spec.routes:
            if route.provider in here:
                return route.provider, route.model or spec.model
        names = ", ".join(r.provider for r in spec.routes)
        raise ModelCallFailed(f"llm: no provider of the routes ({names}) here", infrastructure=True)

    async def run(self, spec: task_pb2.TaskSpec, ctx: ExecutionContext) -> Outcome:
        """Output {"text", "model", "provider", "finish_reason"}; usage from the provider."""
        llm = spec.llm
        try:
            provider, model = self._route(llm)
            if provider == "ollama":
                reply = await self.ollama.stream(self._ollama_spec(llm, model), ctx)
            else:
                reply = await self._cloud(provider, model, llm, ctx)
        except ModelCallFailed as err:
            return failed(err)
        return reply.outcome(model, provider=provider, finish_reason=reply.finish_reason)

    @staticmethod
    def _ollama_spec(llm: task_pb2.LlmSpec, model: str) -> task_pb2.OllamaSpec:
        options = struct_pb2.Struct()
        if llm.max_tokens:
            options["num_predict"] = llm.max_tokens
        if llm.temperature:
            options["temperature"] = llm.temperature
        return task_pb2.OllamaSpec(
            model=model,
            prompt=llm.prompt,
            messages=llm.messages,
            system=llm.system,
            options=options if options.fields else None,
        )

    async def _cloud(
        self, provider: str, model: str, llm: task_pb2.LlmSpec, ctx: ExecutionContext
    ) -> Reply:
        if provider not in _CLOUD:
            known = ", ".join(["ollama", *_CLOUD])
            raise ModelCallFailed(
                f"llm: unknown provider {provider!r} (one of {known})", infrastructure=False
            )
        if not _installed(_CLOUD[provider].sdk):
            raise ModelCallFailed(
                f"llm: the {provider} SDK is not installed on this node (shoal[llm])",
                infrastructure=True,
            )
        if not self._key(provider):
            raise ModelCallFailed(
                f"llm: this node has no API key for {provider}", infrastructure=True
            )
        messages = [(m.role or "user", m.content) for m in llm.messages]
        if llm.prompt:
            messages.append(("user", llm.prompt))
        call = _Call(
            provider,
            model,
            llm.system,
            messages,
            llm.max_tokens,
            # proto3 cannot tell 0 from unset: 0 means the provider's default.
            llm.temperature or None,
        )
        reply = Reply(ctx, model)
        streams = {
            "openai": self._stream_openai,
            "anthropic": self._stream_anthropic,
            "gemini": self._stream_gemini,
        }
        await streams[provider](call, reply)
        return reply

    # -- OpenAI ------------------------------------------------------------------------------

    async def _stream_openai(self, call: _Call, reply: Reply) -> None:
        import openai

        if self._openai is None:
            self._openai = client = openai.AsyncOpenAI(
                api_key=self._key("openai"),
                base_url=self.settings.llm_openai_base_url or None,
                max_retries=0,
            )
            self._closers.append(client.close)
        messages: list[ChatCompletionMessageParam] = []
        if call.system:
            messages.append({"role": "system", "content": call.system})
        for role, content in call.messages:
            if role == "system":
                messages.append({"role": "system", "content": content})
            elif role == "assistant":
                messages.append({"role": "assistant", "content": content})
            else:
                messages.append({"role": "user", "content": content})
        try:
            stream = await self._openai.chat.completions.create(
                model=call.model,
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
                max_completion_tokens=call.max_tokens or openai.omit,
                temperature=openai.omit if call.temperature is None else call.temperature,
            )
            async with stream:  # closes the response, on cancel too
                async for chunk in stream:
                    reply.model = chunk.model or reply.model
                    for choice in chunk.choices:
                        if choice.index == 0:
                            reply.add(choice.delta.content or "")
                            reply.finish_reason = choice.finish_reason or reply.finish_reason
                    if chunk.usage is not None:
                        reply.prompt_tokens = chunk.usage.prompt_tokens
                        reply.completion_tokens = chunk.usage.completion_tokens
        except openai.APIStatusError as err:
            raise _status_failure("openai", err.status_code, _detail(err)) from err
        except openai.OpenAIError as err:  # unreachable, timed out, or broke off mid-stream
            raise ModelCallFailed(f"openai: {_detail(err)}", infrastructure=True) from err

    # -- Anthropic ---------------------------------------------------------------------------

    async def _stream_anthropic(self, call: _Call, reply: Reply) -> None:
        import anthropic

        if self._anthropic is None:
            self._anthropic = client = anthropic.AsyncAnthropic(
                api_key=self._key("anthropic"),
                base_url=self.settings.llm_anthropic_base_url or None,
                max_retries=0,
            )
            self._closers.append(client.close)
        system = [call.system] if call.system else []
        messages: list[MessageParam] = []
        for role, content in call.messages:
            if role == "system":  # kept apart from the turns, as the system prompt
                system.append(content)
            elif role == "assistant":
                messages.append({"role": "assistant", "content": content})
            else:
                messages.append({"role": "user", "content": content})
        try:
            stream = await self._anthropic.messages.create(
                model=call.model,
                messages=messages,
                max_tokens=call.max_tokens or DEFAULT_MAX_TOKENS,
                system="\n\n".join(system) if system else anthropic.omit,
                # No temperature: the Messages API of this SDK generation takes none.
                stream=True,
            )
            async with stream:  # closes the response, on cancel too
                async for event in stream:
                    if event.type == "message_start":
                        reply.model = event.message.model or reply.model
                        reply.prompt_tokens = event.message.usage.input_tokens
                        reply.completion_tokens = event.message.usage.output_tokens
                    elif event.type == "content_block_delta" and event.delta.type == "text_delta":
                        reply.add(event.delta.text)
                    elif event.type == "message_delta":
                        reply.finish_reason = event.delta.stop_reason or reply.finish_reason
                        reply.completion_tokens = event.usage.output_tokens  # cumulative
                        if event.usage.input_tokens is not None:
                            reply.prompt_tokens = event.usage.input_tokens
        except anthropic.APIStatusError as err:
            raise _status_failure("anthropic", err.status_code, _detail(err)) from err
        except anthropic.AnthropicError as err:  # unreachable or timed out
            raise ModelCallFailed(f"anthropic: {_detail(err)}", infrastructure=True) from err

    # -- Gemini ------------------------------------------------------------------------------

    async def _stream_gemini(self, call: _Call, reply: Reply) -> None:
        from google import genai
        from google.genai import errors, types

        if self._gemini is None:
            self._gemini = client = genai.Client(
                vertexai=False,
                api_key=self._key("gemini"),
                http_options=types.HttpOptions(
                    base_url=self.settings.llm_gemini_base_url or None,
                    retry_options=types.HttpRetryOptions(attempts=1),
                ),
            )
            self._closers.append(client.aio.aclose)
        system = [call.system] if call.system else []
        contents: list[types.Content] = []
        for role, content in call.messages:
            if role == "system":
                system.append(content)
            else:
                contents.append(
                    types.Content(
                        role="model" if role in ("assistant", "model") else "user",
                        parts=[types.Part(text=content)],
                    )
                )
        config = types.GenerateContentConfig(
            system_instruction="\n\n".join(system) if system else None,
            max_output_tokens=call.max_tokens or None,
            temperature=call.temperature,
        )
        try:
            stream = await self._gemini.aio.models.generate_content_stream(
                model=call.model, contents=contents, config=config
            )
            async with closing(stream) as chunks:
                async for chunk in chunks:
                    reply.model = chunk.model_version or reply.model
                    candidate = chunk.candidates[0] if chunk.candidates else None
                    if candidate is not None and candidate.content is not None:
                        for part in candidate.content.parts or ():
                            if part.text and not part.thought:
                                reply.add(part.text)
                    if candidate is not None and candidate.finish_reason is not None:
                        reply.finish_reason = str(candidate.finish_reason.value)
                    if (usage := chunk.usage_metadata) is not None:
                        reply.prompt_tokens = usage.prompt_token_count or 0
                        # Thinking is billed as output, so it counts against token quotas too.
                        reply.completion_tokens = (usage.candidates_token_count or 0) + (
                            usage.thoughts_token_count or 0
                        )
        except errors.APIError as err:
            # Gemini says 400 to a wrong key: it is the node's key, as a 401 elsewhere.
            bad_key = err.code == 400 and "API_KEY_INVALID" in str(err.details)
            raise _status_failure("gemini", 401 if bad_key else err.code, _detail(err)) from err
        except _transport_errors() as err:
            reason = str(err) or type(err).__name__
            raise ModelCallFailed(f"gemini: unreachable: {reason}", infrastructure=True) from err


def _transport_errors() -> tuple[type[BaseException], ...]:
    """What the Gemini SDK's HTTP layer raises when the provider cannot be reached: it uses
    httpx2 (or httpx), or aiohttp when installed."""
    out: list[type[BaseException]] = [OSError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError")):
        if _installed(module):
            out.append(getattr(importlib.import_module(module), name))
    if _installed("aiohttp"):
        out.append(importlib.import_module("aiohttp").ClientError)
    return tuple(out)
