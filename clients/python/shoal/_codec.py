"""A function's arguments and result as JSON, by its type hints (pydantic's TypeAdapter).

Shared by the SDK, which encodes a call and decodes its result, and the node's worker, which
decodes the call and encodes the result. Only what JSON holds crosses the wire: data never
becomes code.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import pydantic_core
from pydantic import BaseModel, TypeAdapter, ValidationError

from shoal import _json
from shoal.errors import InvalidArgument
from shoal.spec_checks import is_import_path, is_position

__all__ = [
    "SCALARS",
    "UPSTREAM",
    "CallCodec",
    "CodecError",
    "Untyped",
    "check_importable",
    "import_path",
    "place_step",
]

_P = inspect.Parameter
_ANY: TypeAdapter[Any] = TypeAdapter(Any)

SCALARS: frozenset[type] = frozenset({int, float, str, bool, type(None)})
"""The types of JSON's scalars as Python decodes them."""
_AS_IS: dict[Any, frozenset[type]] = {
    _P.empty: SCALARS,
    Any: SCALARS,
    object: SCALARS,
    int: frozenset({int}),
    float: frozenset({float}),
    str: frozenset({str}),
    bool: frozenset({bool}),
    type(None): frozenset({type(None)}),
}
_NONE: frozenset[type] = frozenset()

UPSTREAM: Any = object()
"""In encode_arguments: an argument that an upstream task's result fills in (sent as null)."""


class Untyped:
    """In encode_arguments: an argument sent as plain JSON, unchecked (upstream results are
    put into it before the worker checks it by the type hint)."""

    def __init__(self, value: Any) -> None:
        self.value = value


def place_step(step: str) -> str:
    """A step of an upstream result's place, escaped as in JSON Pointer."""
    return step.replace("~", "~0").replace("/", "~1")


def _put(container: Any, path: list[str], value: Any) -> None:
    """Put `value` at `path` (steps of place_step) in decoded JSON; CodecError when the path
    leads nowhere."""
    for i, step in enumerate(path):
        key: Any = step.replace("~1", "/").replace("~0", "~")
        if isinstance(container, list):
            if not is_position(key) or int(key) >= len(container):
                raise CodecError(f"upstream place {'/'.join(path)!r} is not in the argument")
            key = int(key)
        elif not isinstance(container, dict) or key not in container:
            raise CodecError(f"upstream place {'/'.join(path)!r} is not in the argument")
        if i == len(path) - 1:
            container[key] = value
        else:
            container = container[key]


class CodecError(InvalidArgument, ValueError):
    """Arguments or a result that do not fit the function's signature or type hints (or are
    not JSON): nothing was sent."""


def import_path(fn: Callable[..., Any]) -> str:
    """`package.module:qualname` of a function defined at a module's top level. A function of
    the program being run (`__main__`) is named by the module it is elsewhere: its own under
    `python -m package.module`, else its file's (`python tasks.py`: `tasks`, as a node started
    with `--import tasks` in that directory holds it)."""
    module = fn.__module__
    if module == "__main__":
        main = sys.modules.get("__main__")
        spec = getattr(main, "__spec__", None)
        if spec is not None and spec.name != "__main__":
            module = spec.name
        elif (stem := Path(getattr(main, "__file__", None) or "").stem).isidentifier():
            module = stem
    return f"{module}:{fn.__qualname__}"


def check_importable(name: str) -> None:
    """CodecError unless `name` is an import path a node can find (not a lambda's, nor that of
    a function defined inside another)."""
    if not is_import_path(name):
        raise CodecError(
            f"{name!r} cannot run on a node: nodes import functions by their path"
            " (package.module:qualname), so a function must be defined at a module's top level"
        )
    if name.startswith("__main__:"):
        raise CodecError(
            f"{name!r} cannot run on a node: it is defined in the program being run (python -c,"
            " a REPL or a notebook), which no node can import; define it in a module and start"
            " the node with --import that module"
        )


def _adapter(hint: Any) -> TypeAdapter[Any]:
    """The adapter of a type hint; its core validator and serializer are called directly
    (TypeAdapter's own methods add a Python call to each, in calls `map` makes thousands of)."""
    if hint is inspect.Parameter.empty:
        return _ANY
    try:
        adapter = TypeAdapter(hint)
    except Exception:  # a hint pydantic cannot build a schema for: taken as it comes
        return _ANY
    if not isinstance(adapter.validator, pydantic_core.SchemaValidator) or not isinstance(
        adapter.serializer, pydantic_core.SchemaSerializer
    ):
        return _ANY  # not built (a reference it cannot resolve): taken as it comes
    return adapter


class CallCodec:
    """Encodes and decodes calls of one function by its signature and type hints."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = fn
        self.signature = inspect.signature(fn)
        try:
            self._hints = typing.get_type_hints(fn)
        except Exception:  # unresolvable forward references: no hints, plain JSON
            self._hints = {}

    @cached_property
    def _positional(self) -> list[inspect.Parameter]:
        kinds = (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD)
        return [p for p in self.signature.parameters.values() if p.kind in kinds]

    @cached_property
    def _var_positional(self) -> inspect.Parameter | None:
        return next(
            (p for p in self.signature.parameters.values() if p.kind is _P.VAR_POSITIONAL), None
        )

    @cached_property
    def _var_keyword(self) -> inspect.Parameter | None:
        return next(
            (p for p in self.signature.parameters.values() if p.kind is _P.VAR_KEYWORD), None
        )

    @cached_property
    def _positional_range(self) -> tuple[float, float] | None:
        """The fewest and most positional arguments of a call the signature takes without
        keywords; None when every such call is refused (a keyword-only argument is required)."""
        params = self.signature.parameters.values()
        if any(p.kind is _P.KEYWORD_ONLY and p.default is _P.empty for p in params):
            return None
        fewest = sum(1 for p in self._positional if p.default is _P.empty)
        most = math.inf if self._var_positional is not None else len(self._positional)
        return fewest, most

    @cached_property
    def _adapters(self) -> dict[str, TypeAdapter[Any]]:
        return {
            name: _adapter(self._hints.get(name, _P.empty)) for name in self.signature.parameters
        }

    @cached_property
    def result_adapter(self) -> TypeAdapter[Any]:
        return _adapter(self._hints.get("return", _P.empty))

    @cached_property
    def _as_is(self) -> tuple[frozenset[type], ...]:
        """For each positional parameter, the types of value that its hint's validation
        returns unchanged and that are JSON as they are: such arguments skip pydantic (most
        calls' arguments, and `map` makes thousands of calls)."""
        return tuple(_AS_IS.get(self._hints.get(p.name, _P.empty), _NONE) for p in self._positional)

    def _all_as_is(self, args: Sequence[Any]) -> bool:
        as_is = self._as_is
        return len(args) <= len(as_is) and all(map(frozenset.__contains__, as_is, map(type, args)))

    def _for_position(self, i: int) -> TypeAdapter[Any]:
        if i < len(self._positional):
            return self._adapters[self._positional[i].name]
        if self._var_positional is not None:
            return self._adapters[self._var_positional.name]
        raise CodecError(
            f"{self._fn.__qualname__} takes {len(self._positional)} positional arguments"
        )

    def _for_keyword(self, name: str) -> TypeAdapter[Any]:
        p = self.signature.parameters.get(name)
        if p is not None and p.kind in (_P.POSITIONAL_OR_KEYWORD, _P.KEYWORD_ONLY):
            return self._adapters[name]
        if self._var_keyword is not None:
            return self._adapters[self._var_keyword.name]
        raise CodecError(f"{self._fn.__qualname__} has no argument {name!r}")

    def check(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        """CodecError unless the signature takes these arguments."""
        counts = self._positional_range
        if not kwargs and counts is not None and counts[0] <= len(args) <= counts[1]:
            return  # what binding would find, without its cost (`map` makes thousands)
        try:
            self.signature.bind(*args, **kwargs)
        except TypeError as err:
            raise CodecError(f"{self._fn.__qualname__}: {err}") from None

    def encode_as_is(self, args: Sequence[Any]) -> bytes | None:
        """The JSON array of positional arguments that the signature takes and that fit their
        hints as they are (most calls' arguments: no pydantic, no binding); None for any
        others (`check`, then `encode_arguments`)."""
        counts = self._positional_range
        if counts is None or not counts[0] <= len(args) or not self._all_as_is(args):
            return None
        try:
            return _dumps(list(args))
        except ValueError as err:  # a NaN or an infinity
            raise CodecError(f"{self._fn.__qualname__}: an argument is not JSON: {err}") from None

    def encode_arguments(
        self, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> tuple[bytes, bytes]:
        """The JSON array of positional and object of keyword arguments."""
        try:
            if not kwargs and self._all_as_is(args):
                return _dumps(list(args)), b"{}"
            plain_args = [
                None if a is UPSTREAM else _plain(self._for_position(i), a)
                for i, a in enumerate(args)
            ]
            plain_kwargs = {
                k: _plain(self._for_keyword(k), v) for k, v in kwargs.items() if v is not UPSTREAM
            }
            encoded_kwargs = _json_of(plain_kwargs, kwargs) if plain_kwargs else b"{}"
            return _json_of(plain_args, args), encoded_kwargs
        except ValidationError as err:  # (a ValueError too)
            raise CodecError(f"{self._fn.__qualname__}: an argument does not fit: {err}") from None
        except (ValueError, TypeError) as err:
            raise CodecError(f"{self._fn.__qualname__}: an argument is not JSON: {err}") from None

    def decode_arguments(
        self, args: str | bytes, kwargs: str | bytes, upstream: Mapping[str, str]
    ) -> tuple[list[Any], dict[str, Any]]:
        """Arguments from their JSON (and upstream results as JSON text), validated by the
        type hints; CodecError when they do not fit."""
        try:
            raw_args = _json.loads(args, lone_surrogates=True) if args else []
            raw_kwargs = _json.loads(kwargs, lone_surrogates=True) if kwargs else {}
        except (ValueError, RecursionError) as err:
            raise CodecError(f"arguments are not JSON: {err}") from None
        if not isinstance(raw_args, list) or not isinstance(raw_kwargs, dict):
            raise CodecError("args must be a JSON array and kwargs a JSON object")
        if not upstream and not raw_kwargs and self._all_as_is(raw_args):
            self.check(raw_args, raw_kwargs)
            return raw_args, raw_kwargs
        nested = {k: v for k, v in upstream.items() if "/" in k} if upstream else {}
        if nested:
            upstream = {k: v for k, v in upstream.items() if "/" not in k}
        for key, text in nested.items():
            head, *path = key.split("/")
            try:
                holder: Any = raw_args[int(head)] if is_position(head) else raw_kwargs[head]
                _put(holder, path, _json.loads(text, lone_surrogates=True))
            except (IndexError, KeyError, ValueError, RecursionError):
                raise CodecError(f"upstream place {key[:80]!r} is not in the arguments") from None
        try:
            out_args = [
                self._for_position(i).validator.validate_json(upstream[str(i)])
                if str(i) in upstream
                else self._for_position(i).validator.validate_python(a)
                for i, a in enumerate(raw_args)
            ]
            out_kwargs = {
                k: self._for_keyword(k).validator.validate_python(v) for k, v in raw_kwargs.items()
            }
            for key, text in upstream.items():
                if is_position(key):
                    if int(key) >= len(out_args):
                        raise CodecError(f"upstream argument {key} is past the positional ones")
                else:
                    out_kwargs[key] = self._for_keyword(key).validator.validate_json(text)
        except ValidationError as err:
            raise CodecError(f"{self._fn.__qualname__}: {err}") from None
        self.check(out_args, out_kwargs)
        return out_args, out_kwargs

    @cached_property
    def _result_as_is(self) -> frozenset[type]:
        """The types of return value that are JSON as they are (see `_as_is`)."""
        return _AS_IS.get(self._hints.get("return", _P.empty), _NONE)

    def encode_result(self, value: Any) -> bytes:
        """The return value as JSON; CodecError when it does not serialize (a NaN or an
        infinity, as in an argument: JSON has none, and null would not be the value)."""
        try:
            if type(value) in self._result_as_is:  # most results: no pydantic needed
                return _dumps(value)
            return _json_of(_plain(self.result_adapter, value), value)
        except ValidationError as err:  # (a ValueError too)
            raise CodecError(
                f"{self._fn.__qualname__} returned a value that does not fit its hint: {err}"
            ) from None
        except (ValueError, TypeError) as err:
            raise CodecError(
                f"{self._fn.__qualname__} returned a value that is not JSON: {err}"
            ) from None

    def decode_result(self, text: str | bytes) -> Any:
        """The return value from its JSON text, typed by the return hint (a string may hold
        lone surrogates, as an argument may: a file name that is not UTF-8, say)."""
        validator = self.result_adapter.validator
        try:
            try:
                return validator.validate_json(text)
            except ValidationError as err:
                if err.errors()[0]["type"] != "json_invalid":
                    raise
                try:
                    value = _json.loads(text, lone_surrogates=True)
                except (ValueError, RecursionError):
                    raise err from None
                return validator.validate_python(value)
        except ValidationError as err:
            raise CodecError(f"{self._fn.__qualname__}: its result does not fit: {err}") from None


def _plain(adapter: TypeAdapter[Any], value: Any) -> Any:
    """`value` as JSON data, once it fits the hint (a tuple for a list, a dict for a
    dataclass: as the function will get it)."""
    if isinstance(value, Untyped):
        return _ANY.serializer.to_python(value.value, mode="json")
    return adapter.serializer.to_python(adapter.validator.validate_python(value), mode="json")


def _json_of(plain: Any, value: Any) -> bytes:
    """The JSON of `plain`, made of `value` by `_plain`; ValueError when `value` holds a NaN or
    an infinity that pydantic made null (it does where the hint is Any, or none)."""
    out = _dumps(plain)
    if b"null" in out and not _finite(value):
        raise ValueError("Out of range float values are not JSON compliant")
    return out


def _finite(value: Any) -> bool:
    """Whether no float in `value` (or in its lists, tuples, sets, dicts, dataclass or model
    fields, and arguments sent untyped) is a NaN or an infinity."""
    stack, seen = [value], set()
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return False
            continue
        if isinstance(item, (str, int, bytes)) or item is None or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, Untyped):
            stack.append(item.value)
        elif isinstance(item, BaseModel):
            stack.extend(item.__dict__.values())
            stack.extend((item.__pydantic_extra__ or {}).values())
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            stack.extend(getattr(item, f.name) for f in dataclasses.fields(item))
    return True


# One encoder for every call: json.dumps with options builds a new one each time.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def _dumps(value: Any) -> bytes:
    """JSON of plain data; ValueError for a NaN or an infinity (no JSON has them)."""
    try:
        out = pydantic_core.to_json(value)
        if b"NaN" not in out and b"Infinity" not in out:
            return out
    except pydantic_core.PydanticSerializationError:
        pass
    return _ENCODER.encode(value).encode()  # the error, or a string that holds such words
