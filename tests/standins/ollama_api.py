"""A stand-in Ollama server: /api/chat and /api/generate (NDJSON streams), /api/tags, /api/ps.

`ollama_target()` gives it, or a real Ollama server when SHOAL_TEST_OLLAMA_URL is set (with
a model it has, SHOAL_TEST_OLLAMA_MODEL): the same tests run against either.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from .model import ModelStandIn
from .server import Exchange

__all__ = ["REAL_OLLAMA_URL", "OllamaStandIn", "OllamaTarget", "ollama_target"]

# Read at import: the tests' hermetic fixture removes every SHOAL_* variable before each test.
REAL_OLLAMA_URL = os.environ.get("SHOAL_TEST_OLLAMA_URL", "")
REAL_OLLAMA_MODEL = os.environ.get("SHOAL_TEST_OLLAMA_MODEL", "")

_DIGEST = "sha256:" + "0" * 64
_DETAILS = {
    "parent_model": "",
    "format": "gguf",
    "family": "llama",
    "families": ["llama"],
    "parameter_size": "1B",
    "quantization_level": "Q4_0",
}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())


class OllamaStandIn(ModelStandIn):
    """Speaks Ollama's HTTP API for the models in `models`; others are not found (404).

    A model that answered a call is loaded (in /api/ps) from then on.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.loaded: set[str] = set()

    async def handle(self, exchange: Exchange) -> None:
        request = exchange.request
        route = (request.method, request.path)
        if route == ("GET", "/"):
            await exchange.send(200, b"Ollama is running", "text/plain; charset=utf-8")
        elif route not in (
            ("GET", "/api/tags"),
            ("GET", "/api/ps"),
            ("POST", "/api/chat"),
            ("POST", "/api/generate"),
        ):
            await exchange.send(404, b"404 page not found", "text/plain")
        elif self.status:
            await exchange.send_json(self.status, {"error": f"stand-in answers {self.status}"})
        elif route == ("GET", "/api/tags"):
            models = [self._model(m) | {"modified_at": _now()} for m in sorted(self.models)]
            await exchange.send_json(200, {"models": models})
        elif route == ("GET", "/api/ps"):
            models = [
                self._model(m) | {"expires_at": _now(), "size_vram": 1 << 20}
                for m in sorted(self.loaded)
            ]
            await exchange.send_json(200, {"models": models})
        else:
            await self._answer(exchange, chat=request.path == "/api/chat")

    @staticmethod
    def _model(name: str) -> dict[str, Any]:
        return {
            "name": name,
            "model": name,
            "size": 1 << 20,
            "digest": _DIGEST,
            "details": _DETAILS,
        }

    async def _answer(self, exchange: Exchange, *, chat: bool) -> None:
        body = exchange.request.json()
        model = body.get("model", "")
        if model not in self.models:
            error = f'model "{model}" not found, try pulling it first'
            await exchange.send_json(404, {"error": error})
            return
        if model in self.failing:
            await exchange.send_json(503, {"error": "stand-in: server busy"})
            return
        self.loaded.add(model)

        def part(token: str, done: bool) -> dict[str, Any]:
            out: dict[str, Any] = {"model": model, "created_at": _now()}
            if chat:
                out["message"] = {"role": "assistant", "content": token}
            else:
                out["response"] = token
            out["done"] = done
            return out

        final = part("", True) | {
            "done_reason": "stop",
            "total_duration": 1_000_000,
            "load_duration": 1000,
            "prompt_eval_count": self.prompt_tokens,
            "prompt_eval_duration": 1000,
            "eval_count": len(self.tokens),
            "eval_duration": 1000,
        }
        if not chat:
            final["context"] = [1, 2, 3]
        if body.get("stream") is False:
            await exchange.send_json(200, final | part(self.text, True))
            return
        await exchange.start_stream("application/x-ndjson")

        async def send(token: str) -> None:
            await exchange.send_chunk(json.dumps(part(token, False)).encode() + b"\n")

        await self.answer_tokens(exchange, send, model)
        await exchange.send_chunk(json.dumps(final).encode() + b"\n")
        await exchange.end_stream()


@dataclass
class OllamaTarget:
    """Where the tests' Ollama is: the stand-in (`standin`), or a real server (None)."""

    url: str
    model: str
    standin: OllamaStandIn | None


@contextlib.asynccontextmanager
async def ollama_target() -> AsyncIterator[OllamaTarget]:
    """The stand-in, started (and stopped after), or the real server the environment names."""
    if REAL_OLLAMA_URL:
        assert REAL_OLLAMA_MODEL, "SHOAL_TEST_OLLAMA_URL needs SHOAL_TEST_OLLAMA_MODEL"
        yield OllamaTarget(REAL_OLLAMA_URL, REAL_OLLAMA_MODEL, None)
        return
    standin = OllamaStandIn()
    await standin.start()
    try:
        yield OllamaTarget(standin.url, "tiny", standin)
    finally:
        await standin.aclose()
