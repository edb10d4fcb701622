"""Stand-ins of outside APIs (Ollama, OpenAI, Anthropic, Gemini): real HTTP servers on loopback
port 0 that speak each API's documented wire format, so the official clients talk to them."""

from .anthropic_api import AnthropicStandIn
from .gemini_api import GeminiStandIn
from .model import TOKENS, ModelStandIn
from .ollama_api import REAL_OLLAMA_URL, OllamaStandIn, OllamaTarget, ollama_target
from .openai_api import OpenAIStandIn
from .server import ClientGone, Exchange, HttpStandIn, Request

__all__ = [
    "REAL_OLLAMA_URL",
    "TOKENS",
    "AnthropicStandIn",
    "ClientGone",
    "Exchange",
    "GeminiStandIn",
    "HttpStandIn",
    "ModelStandIn",
    "OllamaStandIn",
    "OllamaTarget",
    "OpenAIStandIn",
    "Request",
    "ollama_target",
]
