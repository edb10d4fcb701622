"""A stand-in of OpenAI's Chat Completions API: POST /v1/chat/completions, streamed (SSE)."""

from __future__ import annotations

import json
import time
from typing import Any

from .model import ModelStandIn
from .server import Exchange

__all__ = ["OpenAIStandIn"]

_ERRORS = {
    401: ("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    429: ("Rate limit reached for requests.", "requests", "rate_limit_exceeded"),
    500: ("The server had an error while processing your request.", "server_error", None),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None),
}


def _error(status: int, message: str = "", kind: str = "", code: str | None = None) -> Any:
    default = _ERRORS.get(status, (f"stand-in answers {status}", "server_error", None))
    return {
        "error": {
            "message": message or default[0],
            "type": kind or default[1],
            "param": None,
            "code": code if message else default[2],
        }
    }


class OpenAIStandIn(ModelStandIn):
    """Streams `tokens` as chat.completion.chunk events, a usage chunk when asked for
    (stream_options.include_usage), then `[DONE]`. Only streamed calls are answered."""

    async def handle(self, exchange: Exchange) -> None:
        request = exchange.request
        if (request.method, request.path) != ("POST", "/v1/chat/completions"):
            await exchange.send_json(404, _error(404, "Not found", "invalid_request_error"))
            return
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            await exchange.send_json(401, _error(401))
            return
        if self.status:
            await exchange.send_json(self.status, _error(self.status))
            return
        body = request.json()
        model = body.get("model", "")
        if model not in self.models:
            message = f"The model `{model}` does not exist or you do not have access to it."
            await exchange.send_json(
                404, _error(404, message, "invalid_request_error", "model_not_found")
            )
            return
        if model in self.failing:
            await exchange.send_json(503, _error(503))
            return
        if body.get("stream") is not True:
            await exchange.send_json(400, _error(400, "the stand-in only streams", "stand_in"))
            return
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        created = int(time.time())

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            event = {
                "id": "chatcmpl-standin",
                "object": "chat.completion.chunk",
                "created": created,
                "model": f"{model}-2024-01-01",
                "system_fingerprint": "fp_standin",
                "choices": choices,
            }
            if usage:
                event["usage"] = None
            return b"data: " + json.dumps(event | extra).encode() + b"\n\n"

        def delta(content: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
            return [{"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}]

        await exchange.start_stream("text/event-stream; charset=utf-8")
        await exchange.send_chunk(chunk(delta({"role": "assistant", "content": ""})))

        async def send(token: str) -> None:
            await exchange.send_chunk(chunk(delta({"content": token})))

        await self.answer_tokens(exchange, send, model)
        await exchange.send_chunk(chunk(delta({}, "stop")))
        if usage:
            counts = {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": len(self.tokens),
                "total_tokens": self.prompt_tokens + len(self.tokens),
            }
            await exchange.send_chunk(chunk([], usage=counts))
        await exchange.send_chunk(b"data: [DONE]\n\n")
        await exchange.end_stream()
