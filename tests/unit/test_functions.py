"""The function codec (JSON by type hints), specs of calls, progress as the coordinator takes
it, and the worker wire's bounds."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.machinery
import inspect
import math
import sys
import types
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import hypothesis
import pytest
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

import shoal
from shoal import _codec, _json
from shoal._codec import CodecError
from shoal._function import AsyncHandle, Function, failure
from shoal.coordinator.progress import MIN_INTERVAL, accepted_progress
from shoal.errors import InvalidArgument, RemoteError
from shoal.node.functions import wire
from shoal.node.functions.call import Call
from shoal.node.functions.pool import DEPTH, depth_for
from shoal.node.functions.wire import (
    MAX_FRAME,
    Frame,
    FrameReader,
    WireError,
    decode_call,
    encode_call,
    encode_frame,
)
from shoal.specs import timestamp
from shoal.v1 import task_pb2
from shoal.validation import Limits, validate_batch


@dataclass
class Point:
    x: float
    y: float


class Box(BaseModel):
    name: str
    size: int


class Tags(TypedDict):
    a: int


@shoal.task
def place(p: Point, box: Box, tags: Tags, *rest: int, scale: float = 1.0, **more: str) -> Point:
    return Point(p.x * scale, p.y * scale)


@shoal.task(priority="high", retries=2)
async def later(n: int) -> list[int]:
    return [n]


def test_arguments_round_trip_by_their_type_hints() -> None:
    codec = place.codec
    args, kwargs = codec.encode_arguments(
        [Point(1, 2), Box(name="b", size=3), {"a": 1}, 4, 5], {"scale": 2.0, "colour": "red"}
    )
    back_args, back_kwargs = codec.decode_arguments(args, kwargs, {})
    assert back_args == [Point(1, 2), Box(name="b", size=3), {"a": 1}, 4, 5]
    assert back_kwargs == {"scale": 2.0, "colour": "red"}
    assert codec.decode_result(codec.encode_result(Point(3, 4))) == Point(3, 4)


def test_an_argument_json_cannot_hold_is_refused_and_one_that_looks_alike_is_not() -> None:
    codec = place.codec
    p, box, tags = Point(1, 2), Box(name="b", size=3), {"a": 1}
    for scale in (math.nan, math.inf, -math.inf):
        with pytest.raises(CodecError, match="not JSON"):
            codec.encode_arguments([p, box, tags], {"scale": scale})
    args, kwargs = codec.encode_arguments(
        [p, Box(name="NaN\udcff", size=1), tags], {"colour": "-Infinity é"}
    )
    back_args, back_kwargs = codec.decode_arguments(args, kwargs, {})
    assert back_args[1].name == "NaN\udcff" and back_kwargs == {"colour": "-Infinity é"}


@pytest.mark.parametrize(
    ("args", "kwargs", "upstream"),
    [
        (b"{}", b"", {}),  # not an array
        (b"[1", b"", {}),  # not JSON
        (b'["no point"]', b"", {}),  # does not fit the hint
        (b'[{"x": 1, "y": 2}]', b"", {}),  # too few arguments
        (b"[]", b'{"nope": 1}', {}),
        (b"[null]", b"", {"3": "1"}),  # an upstream past the positional arguments
        (b"[" + b"[" * 100_000 + b"]" * 100_000 + b"]", b"", {}),  # deep nesting
    ],
)
def test_hostile_arguments_are_refused_as_codec_errors(
    args: bytes, kwargs: bytes, upstream: dict[str, str]
) -> None:
    with pytest.raises(CodecError):
        place.codec.decode_arguments(args, kwargs, upstream)


def _required_keyword(a: int, *, b: int) -> int:
    return a + b


def _optional(a: int, b: int = 0, /) -> int:
    return a + b


def _starred(a: int, *rest: int) -> int:
    return a + sum(rest)


@pytest.mark.parametrize("fn", [_required_keyword, _optional, _starred])
@pytest.mark.parametrize("count", [0, 1, 2, 3, 40])
def test_a_call_is_checked_as_binding_would(fn: Callable[..., int], count: int) -> None:
    codec = Function(fn).codec
    args = list(range(count))
    try:
        inspect.signature(fn).bind(*args)
    except TypeError:
        with pytest.raises(CodecError):
            codec.check(args, {})
    else:
        codec.check(args, {})


def _halved(x: float) -> float:
    return x / 2


def _echo(text: str) -> str:
    return text


def _int(v: int) -> None: ...
def _float(v: float) -> None: ...
def _str(v: str) -> None: ...
def _bool(v: bool) -> None: ...
def _any(v: Any) -> None: ...
def _object(v: object) -> None: ...
def _bare(v) -> None: ...  # type: ignore[no-untyped-def]
def _optional_int(v: int | None) -> None: ...


_SCALAR = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(alphabet=st.characters())
)


@pytest.mark.parametrize("fn", [_int, _float, _str, _bool, _any, _object, _bare, _optional_int])
@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(value=_SCALAR)
def test_a_scalar_argument_is_encoded_and_decoded_as_its_hint_validates_it(
    fn: Callable[..., None], value: Any
) -> None:
    # Scalars that fit a hint as they are skip pydantic: the outcome must be pydantic's.
    function = Function(fn)
    codec = function.codec
    adapter = codec._for_position(0)
    try:
        expected = _codec._json_of([_codec._plain(adapter, value)], value)
    except (ValidationError, ValueError, TypeError):
        with pytest.raises(CodecError):
            codec.encode_arguments([value], {})
        with pytest.raises(CodecError):
            function.spec(value)
    else:
        assert codec.encode_arguments([value], {})[0] == expected
        assert function.spec(value).function.args == expected.decode()
    try:
        as_json = _codec._dumps([value])
    except ValueError:
        return  # a NaN or an infinity: no JSON holds it
    try:
        typed = adapter.validator.validate_python(_json.loads(as_json, lone_surrogates=True)[0])
    except ValidationError:
        with pytest.raises(CodecError):
            codec.decode_arguments(as_json, b"", {})
    else:
        decoded, _ = codec.decode_arguments(as_json, b"", {})
        assert repr(decoded) == repr([typed]) and type(decoded[0]) is type(typed)  # NaN too


def _returns_int() -> int: ...  # type: ignore[empty-body]
def _returns_float() -> float: ...  # type: ignore[empty-body]
def _returns_str() -> str: ...  # type: ignore[empty-body]
def _returns_bool() -> bool: ...  # type: ignore[empty-body]
def _returns_none() -> None: ...
def _returns_any() -> Any: ...
def _returns_object() -> object: ...
def _returns_bare(): ...  # type: ignore[no-untyped-def]
def _returns_optional_int() -> int | None: ...


@pytest.mark.parametrize(
    "fn",
    [
        _returns_int,
        _returns_float,
        _returns_str,
        _returns_bool,
        _returns_none,
        _returns_any,
        _returns_object,
        _returns_bare,
        _returns_optional_int,
    ],
)
@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(value=_SCALAR)
def test_a_scalar_result_is_encoded_as_its_hint_serializes_it(
    fn: Callable[[], Any], value: Any
) -> None:
    # Results that fit the hint as they are skip pydantic: the outcome must be pydantic's.
    codec = Function(fn).codec
    try:
        expected = _codec._json_of(_codec._plain(codec.result_adapter, value), value)
    except (ValidationError, ValueError, TypeError):
        with pytest.raises(CodecError):
            codec.encode_result(value)
    else:
        assert codec.encode_result(value) == expected


@dataclass
class Loose:
    anything: Any


class LooseBox(BaseModel):
    anything: Any


def _untyped(x, *rest, **more):  # type: ignore[no-untyped-def]
    return x


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(
    "holder",
    [
        lambda v: v,
        lambda v: [1.0, v],
        lambda v: {"k": (v,)},
        lambda v: Loose(v),
        lambda v: [LooseBox(anything={"deep": [v]})],
    ],
)
def test_a_nan_or_infinity_anywhere_in_untyped_data_is_refused_not_sent_as_null(
    holder: Callable[[float], Any], bad: float
) -> None:
    codec = Function(_untyped).codec
    value = holder(bad)
    for args, kwargs in (([value], {}), ([1, value], {}), ([1], {"k": value})):
        with pytest.raises(CodecError, match="not JSON"):
            codec.encode_arguments(args, kwargs)
    with pytest.raises(CodecError, match="not JSON"):
        codec.encode_result(value)
    assert codec.encode_result(holder(1.5)).count(b"1.5") == 1  # and finite ones go through
    assert codec.encode_result([None, holder(2.0)]).startswith(b"[null,")


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        (b"[NaN]", b""),
        (b"[-Infinity]", b""),
        (b'[1, "\\ud800", Infinity]', b""),  # where only Python's parser takes the rest
        (b"[1]", b'{"more": NaN}'),
    ],
)
def test_arguments_with_nan_or_infinity_are_not_json_and_are_refused(
    args: bytes, kwargs: bytes
) -> None:
    with pytest.raises(CodecError, match="not JSON"):
        Function(_untyped).codec.decode_arguments(args, kwargs, {})


def test_a_result_that_is_not_json_is_a_codec_error() -> None:
    with pytest.raises(CodecError):
        later.codec.encode_result([math.nan])
    halved = Function(_halved).codec
    for value in (math.nan, math.inf, -math.inf):  # not null: that would not be the value
        with pytest.raises(CodecError, match="not JSON"):
            halved.encode_result(value)
    assert halved.decode_result(halved.encode_result(1.5)) == 1.5
    assert Function(_echo).codec.encode_result("NaN Infinity") == b'"NaN Infinity"'
    with pytest.raises(CodecError):
        place.codec.encode_result(object())
    with pytest.raises(CodecError):
        later.codec.encode_result("not a list")


def test_a_call_is_a_function_spec_and_handles_become_dependencies() -> None:
    upstream = AsyncHandle(later, None, "t-1", 5)  # type: ignore[arg-type]
    spec = later.spec(upstream)
    assert spec.function.name == f"{__name__}:later"
    assert spec.function.args == "[null]"
    assert dict(spec.function.upstream) == {"0": "${{ deps[0].output.value }}"}
    assert [d.task_id for d in spec.depends_on] == ["t-1"]
    assert spec.priority == task_pb2.PRIORITY_HIGH and spec.retry.max_attempts == 3
    validate_batch([spec], Limits(), single=True)
    with pytest.raises(CodecError):
        later.spec(1, 2)  # too many arguments: refused before anything is sent
    assert asyncio.run(later(3)) == [3]  # still a plain function here
    assert isinstance(later.options(priority="low"), Function)


@shoal.task
def weigh(parts: dict[str, list[Point]], extra: tuple[int, ...] = ()) -> float:
    return sum(p.x for ps in parts.values() for p in ps) + sum(extra)


def test_handles_nested_in_arguments_become_dependencies_typed_in_place() -> None:
    a = AsyncHandle(later, None, "t-a", 5)  # type: ignore[arg-type]
    b = AsyncHandle(later, None, "t-b", 6)  # type: ignore[arg-type]
    spec = weigh.spec({"a/b": [Point(1, 2), a], "c": [Point(b, 0)]}, extra=(b, 4))  # type: ignore[arg-type]
    f = spec.function
    assert dict(f.upstream) == {
        "0/a~1b/1": "${{ deps[0].output.value }}",
        "0/c/0/x": "${{ deps[1].output.value }}",
        "extra/0": "${{ deps[2].output.value }}",
    }
    assert [d.task_id for d in spec.depends_on] == ["t-a", "t-b", "t-b"]
    validate_batch([spec], Limits(), single=True)
    args, kwargs = weigh.codec.decode_arguments(
        f.args,
        f.kwargs,
        {"0/a~1b/1": '{"x": 3, "y": 4}', "0/c/0/x": "5.5", "extra/0": "6"},
    )
    assert args == [{"a/b": [Point(1, 2), Point(3, 4)], "c": [Point(5.5, 0)]}]
    assert kwargs == {"extra": (6, 4)}
    with pytest.raises(CodecError, match="not in the arguments"):  # a place that is not there
        weigh.codec.decode_arguments(f.args, f.kwargs, {"0/zz/0": "1"})
    with pytest.raises(CodecError, match="is not in the argument"):
        weigh.codec.decode_arguments(f.args, f.kwargs, {"0/c/7": "1"})


def test_handles_are_looked_for_to_a_bounded_depth() -> None:
    a = AsyncHandle(later, None, "t-a", 5)  # type: ignore[arg-type]
    deep: object = a
    for _ in range(9):
        deep = [deep]
    with pytest.raises(CodecError, match="8 levels deep"):
        total_of.spec(deep)
    shallow: object = a
    for _ in range(8):
        shallow = [shallow]
    assert len(total_of.spec(shallow).depends_on) == 1
    too_deep = "0" + "/0" * 9
    spec = task_pb2.TaskSpec(function=task_pb2.FunctionSpec(name="a:b", upstream={too_deep: "1"}))
    with pytest.raises(InvalidArgument):
        validate_batch([spec], Limits(), single=True)


@shoal.task
def total_of(values: object) -> int:
    return 0


def test_a_function_spec_is_validated() -> None:
    bad = task_pb2.TaskSpec(function=task_pb2.FunctionSpec(name="os:system; rm"))
    with pytest.raises(InvalidArgument):
        validate_batch([bad], Limits(), single=True)
    worse = task_pb2.TaskSpec(function=task_pb2.FunctionSpec(name="a:b", upstream={"x y": "1"}))
    with pytest.raises(InvalidArgument):
        validate_batch([worse], Limits(), single=True)


@pytest.mark.parametrize(
    ("field", "call", "says"),
    [
        ("function.args", task_pb2.FunctionSpec(args='{"x": 1}'), "must be a JSON array"),
        ("function.args", task_pb2.FunctionSpec(args="7"), "must be a JSON array"),
        ("function.args", task_pb2.FunctionSpec(args="[1,"), "not JSON"),
        ("function.args", task_pb2.FunctionSpec(args="[NaN]"), "not JSON"),
        ("function.args", task_pb2.FunctionSpec(args="[" * 100_000), "not JSON"),
        ("function.kwargs", task_pb2.FunctionSpec(kwargs="[1]"), "must be a JSON object"),
        ("function.kwargs", task_pb2.FunctionSpec(kwargs='{"a": 1'), "not JSON"),
        (
            "function.upstream",
            task_pb2.FunctionSpec(args="[null]", upstream={"1": "${{ deps[0].output.value }}"}),
            "args has no position 1",
        ),
        ("function.args", task_pb2.FunctionSpec(args="[1e400]"), "out of a float's range"),
        ("function.kwargs", task_pb2.FunctionSpec(kwargs='{"x": -1e999}'), "out of a float"),
        # An upstream's output is data: filled in as text, it could reshape the arguments.
        (
            "function.kwargs",
            task_pb2.FunctionSpec(kwargs='{"path": "${{ deps[0].stdout }}", "dry_run": true}'),
            "function.upstream",
        ),
        ("function.args", task_pb2.FunctionSpec(args='["${{ deps[0].stdout }}"]'), "upstream"),
        *(
            (
                "function.upstream['0']",
                task_pb2.FunctionSpec(args="[null]", upstream={"0": value}),
                "one reference and nothing else",
            )
            for value in ("[${{ deps[0].stdout }}]", "\u00a0${{ deps[0].output.value }}")
        ),
        # Digits to str.isdigit that are no position: refused, not dropped (or an error).
        *(
            (
                "function.upstream",
                task_pb2.FunctionSpec(args="[1, 2]", upstream={key: "${{ deps[0].output }}"}),
                "neither a position nor an argument name",
            )
            for key in ("\u00b2", "\u0660", "00", "01")
        ),
    ],
)
def test_arguments_that_no_worker_would_take_are_refused_at_submit(
    field: str, call: task_pb2.FunctionSpec, says: str
) -> None:
    call.name = "a:b"
    spec = task_pb2.TaskSpec(function=call, depends_on=[task_pb2.Dependency(task_id="t-1")])
    with pytest.raises(InvalidArgument) as refused:
        validate_batch([spec], Limits(), single=True)
    found = [(v.field, says in v.description) for v in refused.value.violations]
    assert found == [(f"spec.{field}", True)]


def test_a_function_call_that_asks_for_secrets_is_refused_at_submit() -> None:
    """Its worker serves every call of the function: a secret would outlive the call (and a
    call accepted with one would run without it)."""
    spec = task_pb2.TaskSpec(
        function=task_pb2.FunctionSpec(name="a:b"), secrets=[task_pb2.SecretRef(name="key")]
    )
    with pytest.raises(InvalidArgument) as refused:
        validate_batch([spec], Limits(), single=True)
    assert [v.field for v in refused.value.violations] == ["spec.secrets"]
    spec.ClearField("secrets")
    validate_batch([spec], Limits(), single=True)


def test_arguments_the_workers_take_pass() -> None:
    later = task_pb2.FunctionSpec(
        name="a:b",
        args=' [null, "\\ud800", 1e300] ',  # a lone surrogate escaped, as Python writes it
        kwargs='{"k": {"n": []}}',
        upstream={"0": "${{ deps[0].output.value }}", "k/n": "${{ deps[1].output.value }}"},
    )
    after = [task_pb2.Dependency(task_id=t) for t in ("t-1", "t-2")]
    validate_batch([task_pb2.TaskSpec(function=later, depends_on=after)], Limits(), single=True)


def test_a_result_holding_lone_surrogates_comes_back_as_it_was_returned() -> None:
    """A file name that is not UTF-8 (os.listdir's surrogate escapes), as an argument may."""

    def names(values: list[str]) -> list[str]:
        return values

    codec = _codec.CallCodec(names)
    value = ["a\udcff", "\ud800", "plain"]
    assert codec.decode_result(codec.encode_result(value)) == value
    with pytest.raises(CodecError):
        codec.decode_result('["a", 1')


def test_a_number_beyond_a_float_is_not_json_here() -> None:
    for text in ("[1e400]", b'{"a": [2, -1e309]}', "[-1" + "0" * 300 + ".0e9]", "9" * 308 + ".9e1"):
        with pytest.raises(ValueError, match="range"):
            _json.loads(text)
    assert _json.loads('["1e400", 1.5e308, 1e-999, 123456789012345678901234567890]') == [
        "1e400",
        1.5e308,
        0.0,
        123456789012345678901234567890,
    ]


def test_a_remote_exception_is_raised_typed() -> None:
    task = task_pb2.Task(id="t", state=task_pb2.TASK_STATE_FAILED)
    task.result.output.update(
        {"exception": {"type": "builtins.KeyError", "message": "'k'", "traceback": "Trace"}}
    )
    err = failure(task)
    assert isinstance(err, RemoteError) and err.remote_type == "builtins.KeyError"
    assert "Trace" in str(err)


def test_progress_is_clamped_sampled_and_estimates_an_end() -> None:
    wild = task_pb2.Progress(fraction=7.0, message="x\x1b[2J" + "m" * 1000)
    first = accepted_progress(wild, None, now=100.0, started_at=90.0)
    assert first is not None and first.fraction == 1.0
    assert len(first.message) == 200 and "\x1b" not in first.message
    half = task_pb2.Progress(fraction=0.5)
    early = accepted_progress(half, None, now=100.0, started_at=90.0)
    assert early is not None and early.estimated_end == timestamp(110.0)
    assert accepted_progress(half, early, now=100.0 + MIN_INTERVAL / 2, started_at=90.0) is None
    assert (
        accepted_progress(task_pb2.Progress(fraction=math.nan), None, now=1, started_at=0) is None
    )


def test_the_wire_refuses_oversized_and_malformed_frames() -> None:
    def read(data: bytes) -> list[Frame]:
        frames = FrameReader()
        frames.feed(data)
        return frames.frames()

    two = encode_frame(wire.HELLO, 0, 0.0, b"{}") + encode_frame(wire.DONE, 1, 0.5, b"4")
    assert read(two) == [Frame(wire.HELLO, 0, 0.0, b"{}"), Frame(wire.DONE, 1, 0.5, b"4")]
    too_large = (MAX_FRAME + 1).to_bytes(4, "big") + bytes(17)
    with pytest.raises(WireError):
        read(too_large)
    with pytest.raises(WireError):  # shorter than its own header
        read((2).to_bytes(4, "big") + bytes(17))
    # The frames before a bad one are taken, then the error.
    frames = FrameReader()
    frames.feed(encode_frame(wire.DONE, 1, 0.0, b"4") + too_large)
    assert frames.frames() == [Frame(wire.DONE, 1, 0.0, b"4")]
    with pytest.raises(WireError):
        frames.frames()
    assert read(b"\x00\x00") == []
    assert read(encode_frame(wire.DONE, 1, 0.0, b"4")[:-1]) == []  # not whole yet


def test_frames_are_whole_whatever_the_reads() -> None:
    frames = FrameReader()
    data = b"".join(encode_frame(wire.OUT, i, 1, ("é" * i).encode()) for i in range(50))
    got: list[Frame] = []
    for at in range(0, len(data), 7):  # in reads that cut frames anywhere
        frames.feed(data[at : at + 7])
        got += frames.frames()
    assert [f.id for f in got] == list(range(50)) and got[3].data.decode() == "ééé"


async def test_a_calls_frames_arrive_in_order_and_none_is_lost_to_a_cancel() -> None:
    call = Call(1, "m:f", b"")
    waiting = asyncio.create_task(call.next())
    await asyncio.sleep(0)
    out, done = Frame(wire.OUT, 1, 1, b"hi"), Frame(wire.DONE, 1, 0.0, b"4")
    call.put(out)  # handed to the waiting task
    call.put(done)  # held for the next look
    assert await waiting == out and await call.next() == done
    # A frame handed over just as the task that waited for it was cancelled is kept.
    waiting = asyncio.create_task(call.next())
    await asyncio.sleep(0)
    call.put(done)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    async with asyncio.timeout(5):
        assert await call.next() == done


def test_a_call_frame_holds_its_parts_and_one_that_lies_about_them_is_refused() -> None:
    frames = FrameReader()
    frames.feed(encode_call(7, "m:f", b"[1]", b"{}", b'{"0":"2"}'))
    (frame,) = frames.frames()
    assert (frame.kind, frame.id) == (wire.CALL, 7)
    assert decode_call(frame.data) == ("m:f", b"[1]", b"{}", b'{"0":"2"}')
    with pytest.raises(WireError):
        decode_call(frame.data[:-12])
    with pytest.raises(WireError):
        decode_call(b"\x00")


_FRAMES = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=255),
        st.integers(min_value=0, max_value=2**64 - 1),
        st.floats(allow_nan=False),
        st.binary(max_size=40),
    ),
    max_size=5,
)


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(_FRAMES, st.binary(max_size=60), st.integers(min_value=1, max_value=64))
def test_frames_come_out_as_they_went_in_and_garbage_after_them_breaks_nothing_else(
    sent: list[tuple[int, int, float, bytes]], garbage: bytes, step: int
) -> None:
    data = b"".join(encode_frame(*frame) for frame in sent) + garbage
    frames, got = FrameReader(), []
    try:
        for at in range(0, len(data), step):
            frames.feed(data[at : at + step])
            got += frames.frames()
    except WireError:
        pass
    assert got[: len(sent)] == [Frame(*frame) for frame in sent]
    for frame in got:
        with contextlib.suppress(WireError):  # a call frame's data: its parts, or refused
            _, args, kwargs, upstream = decode_call(frame.data)
            assert len(args) + len(kwargs) + len(upstream) <= len(frame.data)


def test_a_worker_holds_more_calls_only_where_workers_outnumber_the_spare_cores() -> None:
    assert depth_for(4, cores=2) == DEPTH
    assert depth_for(64, cores=2) == 64  # one core besides the node's: one worker at a time
    assert depth_for(64, cores=3) == 32
    assert depth_for(64, cores=8) == DEPTH
    assert depth_for(64, cores=1) == 64


def test_gather_types_results_as_they_come_and_raises_the_first_failure_in_order() -> None:
    def ended(task_id: str, value: str | None) -> task_pb2.Event:
        event = task_pb2.Event(task_id=task_id, state=task_pb2.TASK_STATE_SUCCEEDED)
        if value is None:
            event.state = task_pb2.TASK_STATE_FAILED
            event.result.output.update({"exception": {"type": "E", "message": task_id}})
        else:
            event.result.output.fields["value"].string_value = value
        return event

    class Watching:
        def __init__(self, events: list[task_pb2.Event]) -> None:
            self.events = events

        async def watch(self, *, since: int, states: object) -> object:
            for event in self.events:
                yield event

    def gathered(events: list[task_pb2.Event], ids: list[str]) -> list[list[int]]:
        client = Watching(events)
        handles = [AsyncHandle(later, client, i, 5) for i in ids]  # type: ignore[arg-type]
        return asyncio.run(shoal.async_gather(handles))

    # Out of order, with others' events between and a repeated end: typed, in the handles' order.
    events = [ended("b", "[2]"), ended("x", "oops"), ended("a", "[1]"), ended("b", None)]
    assert gathered(events, ["a", "b"]) == [[1], [2]]
    # "c" failed first, but "b" comes first among the handles: its failure is raised.
    events = [ended("c", None), ended("a", "[1]"), ended("b", None)]
    with pytest.raises(RemoteError, match="b"):
        gathered(events, ["a", "b", "c"])
    # A result that does not fit the type is a failure in its turn too.
    with pytest.raises(CodecError):
        gathered([ended("a", '"no list"'), ended("b", None)], ["a", "b"])


def test_options_name_the_tasks_and_replace_the_functions_own() -> None:
    named = later.options(name="[/x] nightly", retries=5)
    spec = named.spec(1)
    assert spec.name == "[/x] nightly" and spec.function.name == later.name == named.name
    assert spec.retry.max_attempts == 6 and spec.priority == task_pb2.PRIORITY_HIGH
    assert later.spec(1).name == "later" and later.spec(1).retry.max_attempts == 3
    assert later.options(priority="low").spec(1).retry.max_attempts == 3


def test_options_take_resources_and_a_bad_option_is_refused_where_it_is_written() -> None:
    heavy = later.options(resources={"cpu": 2, "memory_mb": 512, "gpus": 1, "slots": 2})
    assert heavy.spec(1).resources == task_pb2.ResourceRequest(
        cpu=2, memory_mb=512, gpus=1, slots=2
    )
    with pytest.raises(TypeError, match="no task option priorty"):
        shoal.task(priorty="high")(total_of.fn)
    with pytest.raises(InvalidArgument, match="priority must be one of"):
        shoal.task(priority="hgh")(total_of.fn)
    for resources in ({"cpus": 1}, {"slots": 1.5}, {"gpus": -1}, {"cpu": "2"}, {"slots": True}):
        with pytest.raises(InvalidArgument, match=r"resources\."):
            later.options(resources=resources)


def test_a_generator_function_is_refused() -> None:
    def numbers(n: int) -> Iterator[int]:
        yield from range(n)

    async def later_numbers(n: int) -> AsyncIterator[int]:
        yield n

    for fn in (numbers, later_numbers):
        with pytest.raises(TypeError, match="generator function"):
            shoal.task(fn)


def test_a_function_of_the_program_run_is_named_by_its_module_elsewhere(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def fn() -> None: ...

    fn.__module__, fn.__qualname__ = "__main__", "fn"
    script = types.ModuleType("__main__")
    script.__file__ = str(tmp_path / "tasks.py")
    monkeypatch.setitem(sys.modules, "__main__", script)
    assert Function(fn).name == "tasks:fn"  # python tasks.py: as `--import tasks` holds it
    script.__spec__ = importlib.machinery.ModuleSpec("app.tasks", None)
    assert Function(fn).name == "app.tasks:fn"  # python -m app.tasks
    script.__spec__, script.__file__ = None, str(tmp_path / "not-a-module.py")
    assert Function(fn).name == "__main__:fn"  # no better name (python -c, a REPL, a notebook)
    with pytest.raises(CodecError, match="defined in the program being run"):
        Function(fn).spec()  # refused before it is sent: no node can import it


def test_a_lambda_or_nested_function_runs_here_but_is_refused_a_node() -> None:
    def outer() -> Function[[int], int]:
        @shoal.task
        def inner(x: int) -> int:
            return x + 1

        return inner

    for fn in (outer(), shoal.task(lambda x: x + 1)):
        assert fn(1) == 2
        with pytest.raises(CodecError, match="must be defined at a module's top level"):
            fn.spec(1)


def test_a_module_that_fails_to_import_is_reported_with_where_it_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "broken_tasks.py").write_text(
        "import shoal\n\n\n@shoal.task(timeout='2')\ndef f() -> None:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from shoal.node.functions import worker

    found, errors = worker._load(["broken_tasks", "no_such_tasks_module"])
    assert found == {}
    assert errors == [
        "broken_tasks: TypeError: timeout must be a timedelta or seconds, not str"
        f" ({tmp_path / 'broken_tasks.py'}:4)",
        "no_such_tasks_module: ModuleNotFoundError: No module named 'no_such_tasks_module'",
    ]
