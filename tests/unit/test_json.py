"""shoal._json: pydantic-core's JSON where it agrees with the standard library, the standard
library's answer where pydantic-core refuses (lone surrogates); bad JSON is a ValueError."""

from __future__ import annotations

import json

import pytest

from shoal import _json


@pytest.mark.parametrize(
    "value",
    [{"id": 3, "op": "done", "value": "[1,2]", "took": 1.5e-05}, [], "é\n\x00", 10**30, None],
)
def test_what_goes_out_comes_back(value: object) -> None:
    text = _json.dumps(value)
    assert json.loads(text) == value == _json.loads(text)


def test_a_lone_surrogate_goes_as_the_byte_it_escapes() -> None:
    assert _json.dumps({"data": "a\udcffb"}) == b'{"data":"a\xffb"}'


def test_a_lone_surrogate_escape_reads_as_python_reads_it() -> None:
    assert _json.loads('["\\ud800"]') == ["\ud800"]


@pytest.mark.parametrize("text", [b"", b"\xff", b"{", b'{"a":1}x', b"[" * 100_000])
def test_what_is_not_json_is_a_value_error(text: bytes) -> None:
    with pytest.raises((ValueError, RecursionError)):
        _json.loads(text)
