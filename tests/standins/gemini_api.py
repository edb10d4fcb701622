"""A stand-in of the Gemini API: POST /v1(beta)/models/{model}:streamGenerateContent?alt=sse."""

from __future__ import annotations

import json
import re
from typing import Any

from .model import ModelStandIn
from .server import Exchange

__all__ = ["GeminiStandIn"]

_PATH = re.compile(r"/(?P<version>v1|v1beta)/models/(?P<model>[^/:]+):streamGenerateContent\Z")
_STATUS = {
    400: "INVALID_ARGUMENT",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


def _error(status: int, message: str, details: list[Any] | None = None) -> Any:
    error = {"code": status, "message": message, "status": _STATUS.get(status, "UNKNOWN")}
    if details:
        error["details"] = details
    return {"error": error}


class GeminiStandIn(ModelStandIn):
    """Streams `tokens` as GenerateContentResponse events (candidates, usageMetadata); the
    last one has finishReason STOP. A wrong key is INVALID_ARGUMENT (400), as Gemini says."""

    async def handle(self, exchange: Exchange) -> None:
        request = exchange.request
        match = _PATH.match(request.path)
        if request.method != "POST" or match is None or request.query.get("alt") != "sse":
            await exchange.send_json(404, _error(404, "stand-in: no such method"))
            return
        key = request.headers.get("x-goog-api-key") or request.query.get("key")
        if self.api_key and key != self.api_key:
            reason = {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
            }
            message = "API key not valid. Please pass a valid API key."
            await exchange.send_json(400, _error(400, message, [reason]))
            return
        if self.status:
            await exchange.send_json(
                self.status, _error(self.status, f"stand-in answers {self.status}")
            )
            return
        model = match["model"]
        if model not in self.models:
            message = f"models/{model} is not found for API version {match['version']}"
            await exchange.send_json(404, _error(404, message))
            return
        await exchange.start_stream("text/event-stream")
        sent = 0

        def event(text: str, finish: str | None = None) -> bytes:
            candidate: dict[str, Any] = {
                "content": {"parts": [{"text": text}], "role": "model"},
                "index": 0,
            }
            if finish:
                candidate["finishReason"] = finish
            usage = {
                "promptTokenCount": self.prompt_tokens,
                "candidatesTokenCount": sent,
                "totalTokenCount": self.prompt_tokens + sent,
            }
            data = {
                "candidates": [candidate],
                "usageMetadata": usage,
                "modelVersion": f"{model}-001",
                "responseId": "standin",
            }
            return b"data: " + json.dumps(data).encode() + b"\r\n\r\n"

        last = len(self.tokens) - 1

        async def send(token: str) -> None:
            nonlocal sent
            sent += 1
            await exchange.send_chunk(event(token, "STOP" if sent - 1 == last else None))

        await self.answer_tokens(exchange, send, model)
        await exchange.end_stream()
