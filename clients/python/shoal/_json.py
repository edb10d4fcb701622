"""JSON in and out at the speed of pydantic-core's parser and serializer (Rust, several times
the standard library's), with the standard library's answer wherever pydantic-core refuses
what it takes: a lone surrogate, escaped in JSON text or held by a string."""

from __future__ import annotations

import json
from typing import Any

import pydantic_core

__all__ = ["dumps", "loads"]

# One encoder for every call: json.dumps with options builds a new one each time.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def loads(data: bytes | bytearray | str) -> Any:
    """The value of JSON text; ValueError (or RecursionError) when it is not JSON."""
    try:
        return pydantic_core.from_json(data)
    except ValueError:
        return json.loads(data)  # the error to give, or what only Python takes


def dumps(value: Any) -> bytes:
    """Compact JSON of plain data (dicts with string keys, lists, strings, numbers, bools, None);
    a lone surrogate in a string goes as the byte it escapes."""
    try:
        return pydantic_core.to_json(value)
    except pydantic_core.PydanticSerializationError:
        return _ENCODER.encode(value).encode(errors="surrogateescape")
