"""`ollama`: generate or chat with a model of the node's Ollama server, tokens streamed as output.

Also what the node's model calls share: the `Reply` a call builds while it streams its tokens
as stdout, `ModelCallFailed` for a failure that is the task's or (infrastructure) the backend's,
and `OllamaServer.stream`, the one way to stream a call to Ollama (the `llm` executor's too).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import httpx
import ollama
from google.protobuf import json_format

from shoal.config import NodeSettings
from shoal.node.executors.base import ExecutionContext, Executor, Outcome, RunFailed, register
from shoal.v1 import node_pb2, task_pb2

__all__ = [
    "DEFAULT_OLLAMA_HOST",
    "ModelCallFailed",
    "OllamaExecutor",
    "OllamaServer",
    "Reply",
    "closing",
    "failed",
]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

DEFAULT_OLLAMA_HOST = "http://127.0.0.1:11434"
_PROBE_TIMEOUT = 2.0  # seconds an availability or model-list probe may take
_CONNECT_TIMEOUT = 10.0  # the task's own timeout bounds the rest (a model loads slowly)
MAX_ERROR = 500  # characters of a backend's error message kept in a result


class ModelCallFailed(RunFailed):
    """A model call failed: the task's fault, or (`infrastructure`) the backend's or the node's."""

    def __init__(self, message: str, *, infrastructure: bool) -> None:
        super().__init__(message[:MAX_ERROR], infrastructure=infrastructure)


@dataclass
class Reply:
    """What a streamed model call produced; `add` emits each token as stdout as it comes."""

    ctx: ExecutionContext
    model: str  # as the backend names it (it may add a version)
    parts: list[str] = field(default_factory=list)
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, token: str) -> None:
        if token:
            self.parts.append(token)
            self.ctx.emit(task_pb2.OutputChunk(stream=task_pb2.OUTPUT_STREAM_STDOUT, data=token))

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def outcome(self, usage_model: str, **output: str) -> Outcome:
        """SUCCEEDED: output {"text", "model", **output}, the tail of the text as stdout, and
        usage under `usage_model`, the name the task asked for (the coordinator prices and
        limits by it). The cost stays 0: the coordinator prices by model."""
        text = self.text
        result = task_pb2.TaskResult(
            exit_code=0,
            stdout=_tail(text, self.ctx.output_tail_bytes),
            usage=task_pb2.Usage(
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion_tokens,
                model=usage_model,
            ),
        )
        result.output.update({"text": text, "model": self.model, **output})
        return Outcome(task_pb2.TASK_STATE_SUCCEEDED, result)


def _tail(text: str, limit: int) -> str:
    """The last `limit` bytes of `text` in UTF-8 (no character cut in half)."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[len(data) - limit :].decode(errors="ignore")


@contextlib.asynccontextmanager
async def closing(stream: AsyncIterator[_T]) -> AsyncGenerator[AsyncIterator[_T], None]:
    """Close a streamed answer when done, on cancel too: that closes its HTTP request (SDKs
    type their streams as AsyncIterator, though they are generators that can be closed)."""
    try:
        yield stream
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


def failed(err: ModelCallFailed) -> Outcome:
    return err.outcome()


def _options(spec: task_pb2.OllamaSpec) -> dict[str, Any] | None:
    if not spec.HasField("options"):
        return None
    # A Struct holds every number as a float; Ollama's integer options (num_ctx, seed) want ints.
    return {
        k: int(v) if isinstance(v, float) and v.is_integer() else v
        for k, v in json_format.MessageToDict(spec.options).items()
    }


def _format(spec: task_pb2.OllamaSpec) -> Literal["json"] | dict[str, Any] | None:
    if not spec.format:
        return None
    if spec.format == "json":
        return "json"
    try:
        schema = json.loads(spec.format)
    except json.JSONDecodeError:
        schema = None
    if not isinstance(schema, dict):
        raise ModelCallFailed(
            'ollama.format must be "json" or a JSON schema (an object)', infrastructure=False
        )
    return schema


class OllamaServer:
    """The node's Ollama server (`ollama_host`, else $OLLAMA_HOST, else localhost:11434) and
    a client of it, made on first use (on the node's loop)."""

    def __init__(self, settings: NodeSettings) -> None:
        self.host = settings.ollama_host or os.environ.get("OLLAMA_HOST") or DEFAULT_OLLAMA_HOST
        self._client: ollama.AsyncClient | None = None

    def client(self) -> ollama.AsyncClient:
        if self._client is None:
            self._client = ollama.AsyncClient(
                host=self.host, timeout=httpx.Timeout(None, connect=_CONNECT_TIMEOUT)
            )
        return self._client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()  # type: ignore[no-untyped-call]

    async def answers(self) -> bool:
        """Whether the server answers (lists its models) within a short timeout."""
        try:
            async with asyncio.timeout(_PROBE_TIMEOUT):
                await self.client().list()
        except Exception as err:  # whatever went wrong, there is no usable server
            _log.debug("no Ollama server at %s: %s", self.host, err)
            return False
        return True

    async def names(self, loaded: bool) -> list[str]:
        """The server's models (`ollama list`), or those in memory now (`ollama ps`); [] when
        it does not answer within a short timeout."""
        try:
            async with asyncio.timeout(_PROBE_TIMEOUT):
                listed = await (self.client().ps() if loaded else self.client().list())
        except Exception as err:  # a probe: no answer means no models
            _log.debug("Ollama at %s did not list its models: %s", self.host, err)
            return []
        return sorted({m.model for m in listed.models if m.model})

    async def stream(self, spec: task_pb2.OllamaSpec, ctx: ExecutionContext) -> Reply:
        """Run `spec`, each token emitted as stdout as it arrives; raises ModelCallFailed.

        Chat when it has messages (`system` prepended, `prompt` appended as the last user
        message), else generate. Cancelling it closes the request at once.
        """
        client = self.client()
        reply = Reply(ctx, spec.model)
        options, fmt = _options(spec), _format(spec)
        try:
            parts: AsyncIterator[ollama.ChatResponse] | AsyncIterator[ollama.GenerateResponse]
            if spec.messages:
                messages = [{"role": "system", "content": spec.system}] if spec.system else []
                messages += [
                    {"role": m.role or "user", "content": m.content} for m in spec.messages
                ]
                if spec.prompt:
                    messages.append({"role": "user", "content": spec.prompt})
                parts = await client.chat(
                    spec.model, messages, options=options, format=fmt, stream=True
                )
            else:
                # An empty system would replace the model's own: only a set one is sent.
                system: dict[str, Any] = {"system": spec.system} if spec.system else {}
                parts = await client.generate(
                    spec.model, spec.prompt, options=options, format=fmt, stream=True, **system
                )
            # Closing the generator (on cancel too) closes its HTTP response and connection.
            async with closing(parts) as stream:
                async for part in stream:
                    if isinstance(part, ollama.ChatResponse):
                        reply.add(part.message.content or "")
                    elif isinstance(part, ollama.GenerateResponse):
                        reply.add(part.response or "")
                    if part.done:
                        reply.model = part.model or reply.model
                        reply.finish_reason = part.done_reason or ""
                        reply.prompt_tokens = part.prompt_eval_count or 0
                        reply.completion_tokens = part.eval_count or 0
        except (ollama.ResponseError, httpx.TransportError, ConnectionError) as err:
            raise self._failure(spec.model, err) from err
        return reply

    def _failure(self, model: str, err: Exception) -> ModelCallFailed:
        if not isinstance(err, ollama.ResponseError):
            # Refused, reset or timed out (httpx.TransportError, ConnectionError).
            reason = str(err) or type(err).__name__
            return ModelCallFailed(
                f"ollama at {self.host}: connection failed: {reason}", infrastructure=True
            )
        status = err.status_code
        if status == 404:
            return ModelCallFailed(
                f"ollama: model {model!r} not found at {self.host} (HTTP 404): {err.error}",
                infrastructure=False,
            )
        if 400 <= status < 500:
            return ModelCallFailed(f"ollama: HTTP {status}: {err.error}", infrastructure=False)
        # 5xx, or an error line in the middle of a stream (no status): the server failed.
        what = f"HTTP {status}" if status > 0 else "failed while streaming"
        return ModelCallFailed(f"ollama at {self.host}: {what}: {err.error}", infrastructure=True)


@register
class OllamaExecutor(Executor):
    name = "ollama"

    refreshes = True

    def __init__(self, settings: NodeSettings) -> None:
        super().__init__(settings)
        self.server = OllamaServer(settings)
        # Its server's models, and those it holds in memory now (heartbeats carry them, so the
        # coordinator prefers a node where a task's model is loaded).
        self._models: list[str] = []
        self._loaded: list[str] = []

    async def async_available(self) -> bool:
        return await self.server.answers()

    def offers(self, info: node_pb2.NodeInfo) -> None:
        # What its server says, rather than what the machine probe found.
        del info.ollama_models[:]
        info.ollama_models.extend(self._models)
        info.loaded_models.extend(self._loaded)

    def offers_now(self, heartbeat: node_pb2.Heartbeat) -> None:
        heartbeat.loaded_models.extend(self._loaded)

    async def async_refresh(self) -> bool:
        models, loaded = await asyncio.gather(self.models(), self.loaded_models())
        changed = loaded != self._loaded
        self._models, self._loaded = models, loaded
        return changed

    async def models(self) -> list[str]:
        """The models the node's Ollama server has (`ollama list`), for the node's info; []
        when it does not answer within a short timeout."""
        return await self.server.names(loaded=False)

    async def loaded_models(self) -> list[str]:
        """The models the node's Ollama server holds in memory now (`ollama ps`), for the
        node's heartbeats; [] when it does not answer within a short timeout."""
        return await self.server.names(loaded=True)

    async def aclose(self) -> None:
        await self.server.aclose()

    async def run(self, spec: task_pb2.TaskSpec, ctx: ExecutionContext) -> Outcome:
        """Output {"text", "model", "done_reason"}; usage from the server's token counts."""
        try:
            reply = await self.server.stream(spec.ollama, ctx)
        except ModelCallFailed as err:
            return failed(err)
        return reply.outcome(spec.ollama.model, done_reason=reply.finish_reason)
