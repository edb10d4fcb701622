"""shoal._json: pydantic-core's JSON; a lone surrogate goes out as U+FFFD and is refused coming
in (unless taken as the standard library takes it); bad JSON is a ValueError."""

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


def test_a_lone_surrogate_goes_as_the_replacement_character() -> None:
    out = _json.dumps({"data": "a\udcffb\ud800c\U0001f600"})
    assert out.decode() == '{"data":"a\ufffdb\ufffdc\U0001f600"}'


def test_a_lone_surrogate_escape_is_refused_unless_taken_as_python_takes_it() -> None:
    with pytest.raises(ValueError):
        _json.loads('["\\ud800"]')
    assert _json.loads('["\\ud800"]', lone_surrogates=True) == ["\ud800"]


@pytest.mark.parametrize("text", [b"", b"\xff", b"{", b'{"a":1}x', b"[" * 100_000])
def test_what_is_not_json_is_a_value_error(text: bytes) -> None:
    with pytest.raises((ValueError, RecursionError)):
        _json.loads(text)
