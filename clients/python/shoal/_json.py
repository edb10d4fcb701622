"""JSON in and out at the speed of pydantic-core's parser and serializer (Rust, several times
the standard library's). Lone surrogates, which no UTF-8 text (and no protobuf string) holds:
`dumps` writes each as U+FFFD; `loads` refuses them unless asked to take them as Python does."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pydantic_core

__all__ = ["dumps", "loads"]

# One encoder for every call: json.dumps with options builds a new one each time.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def loads(data: bytes | bytearray | str, *, lone_surrogates: bool = False) -> Any:
    """The value of JSON text; ValueError (or RecursionError) when it is not JSON (NaN and
    Infinity are not, nor is a number too large for a float, such as 1e400), or (unless
    `lone_surrogates`) when it escapes a lone surrogate."""
    try:
        value = pydantic_core.from_json(data, allow_inf_nan=False)
    except ValueError:
        if not lone_surrogates:
            raise
        value = json.loads(data, parse_constant=_not_json)  # the error, or what only Python takes
    big = _BIG.search(data) if isinstance(data, str) else _BIG_BYTES.search(data)
    if big is not None and not _finite(value):
        raise ValueError("a number out of a float's range (such as 1e400)")
    return value


# A number that a float cannot hold has an exponent or 309 digits before its point: only text
# that has one is searched for the infinity it became.
_BIG = re.compile(r"\d[eE]|\d{309}")
_BIG_BYTES = re.compile(_BIG.pattern.encode())


def _finite(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return False
        elif isinstance(item, list):
            stack += item
        elif isinstance(item, dict):
            stack += item.values()
    return True


def _not_json(word: str) -> Any:
    raise ValueError(f"{word} is not JSON")


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON of plain data (dicts with string keys, lists, strings, numbers, bools,
    None); a lone surrogate in a string goes as U+FFFD."""
    try:
        return pydantic_core.to_json(value)
    except pydantic_core.PydanticSerializationError:
        text = _ENCODER.encode(value)
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode()
