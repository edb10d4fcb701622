"""A stand-in of Anthropic's Messages API: POST /v1/messages, streamed (SSE events)."""

from __future__ import annotations

import json
from typing import Any

from .model import ModelStandIn
from .server import Exchange

__all__ = ["AnthropicStandIn"]

_ERRORS = {
    400: ("invalid_request_error", "invalid request"),
    401: ("authentication_error", "invalid x-api-key"),
    404: ("not_found_error", "not found"),
    429: ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit"),
    500: ("api_error", "Internal server error"),
    529: ("overloaded_error", "Overloaded"),
}


def _error(status: int, message: str = "") -> Any:
    kind, default = _ERRORS.get(status, ("api_error", f"stand-in answers {status}"))
    return {"type": "error", "error": {"type": kind, "message": message or default}}


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


class AnthropicStandIn(ModelStandIn):
    """Streams `tokens` as message_start, content_block_delta (text_delta) ..., message_delta
    (stop_reason, output_tokens) and message_stop events. Only streamed calls are answered."""

    async def handle(self, exchange: Exchange) -> None:
        request = exchange.request
        if (request.method, request.path) != ("POST", "/v1/messages"):
            await exchange.send_json(404, _error(404))
            return
        # The key comes as x-api-key, or (as newer SDKs send it) as a bearer token.
        keys = {request.headers.get("x-api-key"), request.headers.get("authorization")}
        if self.api_key and not {self.api_key, f"Bearer {self.api_key}"} & keys:
            await exchange.send_json(401, _error(401))
            return
        if self.status:
            await exchange.send_json(self.status, _error(self.status))
            return
        body = request.json()
        model = body.get("model", "")
        if model not in self.models:
            await exchange.send_json(404, _error(404, f"model: {model}"))
            return
        if body.get("stream") is not True:
            await exchange.send_json(400, _error(400, "the stand-in only streams"))
            return
        await exchange.start_stream("text/event-stream; charset=utf-8")
        message = {
            "id": "msg_standin",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": model,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self.prompt_tokens, "output_tokens": 1},
        }
        await exchange.send_chunk(
            _event("message_start", {"type": "message_start", "message": message})
        )
        await exchange.send_chunk(
            _event(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            )
        )
        await exchange.send_chunk(_event("ping", {"type": "ping"}))

        async def send(token: str) -> None:
            delta = {"type": "text_delta", "text": token}
            await exchange.send_chunk(
                _event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": 0, "delta": delta},
                )
            )

        await self.answer_tokens(exchange, send, model)
        await exchange.send_chunk(
            _event("content_block_stop", {"type": "content_block_stop", "index": 0})
        )
        await exchange.send_chunk(
            _event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": len(self.tokens)},
                },
            )
        )
        await exchange.send_chunk(_event("message_stop", {"type": "message_stop"}))
        await exchange.end_stream()
