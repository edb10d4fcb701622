"""Tools for `tool` tasks: each takes the task's input (a dict) and returns a JSON-able value."""

from __future__ import annotations

import asyncio
import re
import unicodedata
from typing import Any

__all__ = ["sleep", "slugify"]


def slugify(data: dict[str, Any]) -> dict[str, str]:
    """{"text": "Hello, World!"} -> {"slug": "hello-world"}. A sync tool: it runs in a thread."""
    text = data.get("text")
    if not isinstance(text, str):
        raise TypeError(f"input.text must be a string, not {type(text).__name__}")
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return {"slug": re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")}


async def sleep(data: dict[str, Any]) -> float:
    """{"seconds": 2} waits that long and returns it. An async tool: it runs on the node's loop,
    and a cancelled task cancels it."""
    seconds = float(data.get("seconds", 0))
    await asyncio.sleep(max(0.0, min(seconds, 3600.0)))
    return seconds
