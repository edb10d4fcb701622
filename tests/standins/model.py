"""What every model API stand-in shares: the answer's tokens and the switches tests turn."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable

from .server import Exchange, HttpStandIn

__all__ = ["TOKENS", "ModelStandIn"]

TOKENS = ("Hello", ",", " shoal", "!")
"""What a stand-in answers by default, token by token."""


class ModelStandIn(HttpStandIn):
    """A model API that answers every prompt with `tokens` (one per streamed chunk).

    Switches: `status` answers every call with that HTTP error (0: answer); `delay` seconds
    pass before each token; while `hold` is an unset event, the last token waits for it.
    `first_token` is set once a first token went out; models in `endless` never finish, and
    those in `failing` answer 503 (Ollama and OpenAI). `api_key`, when set, must be presented.
    """

    def __init__(
        self,
        *,
        models: Iterable[str] = ("tiny",),
        tokens: Iterable[str] = TOKENS,
        prompt_tokens: int = 7,
        api_key: str = "",
    ) -> None:
        super().__init__()
        self.models = set(models)
        self.tokens = list(tokens)
        self.prompt_tokens = prompt_tokens
        self.api_key = api_key
        self.status = 0
        self.delay = 0.0
        self.hold: asyncio.Event | None = None
        self.endless: set[str] = set()
        self.failing: set[str] = set()
        self.first_token = asyncio.Event()

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    async def answer_tokens(
        self, exchange: Exchange, send: Callable[[str], Awaitable[None]], model: str = ""
    ) -> None:
        """Send each token with `send`, after `delay`, the last one after `hold` too; for a
        model named in `endless`, the last one never comes (until the client goes)."""
        last = len(self.tokens) - 1
        for i, token in enumerate(self.tokens):
            if self.delay:
                await exchange.wait(asyncio.sleep(self.delay))
            if i == last and self.hold is not None:
                await exchange.wait(self.hold.wait())
            if i == last and model in self.endless:
                await exchange.wait(asyncio.Event().wait())
            await send(token)
            self.first_token.set()
