"""Upstream outputs in a dependent task's spec: `${{ deps[0].stdout }}` and friends.

A dependent task's strings (argv, script, code, env values, URLs, prompts, Struct strings —
every string of its kind) may refer to the results of the tasks it depends on, by their
position in `depends_on`:

    ${{ deps[0].stdout }}        the upstream's stdout tail, without trailing newlines
    ${{ deps[0].stderr }}        likewise stderr
    ${{ deps[0].exit_code }}     its exit code
    ${{ deps[0].output }}        its structured (JSON) result, as JSON
    ${{ deps[0].output.a.b }}    one value inside it: a string as is, anything else as JSON

References are checked at submit time and filled in when the task is dispatched. An http
task's header values may also name the task's node secrets, `${{ secrets.NAME }}`: those stay
as they are, for the node to fill in.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from shoal.specs import SECRET_REFERENCE
from shoal.v1 import task_pb2

__all__ = ["references", "render"]

_REF = re.compile(
    r"\$\{\{\s*deps\[(\d+)\]\.(stdout|stderr|exit_code|output)((?:\.[A-Za-z0-9_-]+)*)\s*\}\}"
)
_ANY_REF = re.compile(r"\$\{\{.*?\}\}")


def _each_string(message: Message, fn: Callable[[str], str | None]) -> None:
    """Call `fn` on every string in `message`, recursively; a non-None result replaces it."""
    for fd, value in message.ListFields():
        if fd.type == FieldDescriptor.TYPE_STRING:
            if fd.is_repeated:
                for i, item in enumerate(value):
                    if (new := fn(item)) is not None:
                        value[i] = new
            elif (new := fn(value)) is not None:
                setattr(message, fd.name, new)
        elif fd.type == FieldDescriptor.TYPE_MESSAGE and fd.message_type is not None:
            if fd.message_type.GetOptions().map_entry:
                if fd.message_type.fields_by_name["value"].type == FieldDescriptor.TYPE_STRING:
                    for key in list(value):
                        if (new := fn(value[key])) is not None:
                            value[key] = new
                else:
                    for key in list(value):
                        _each_string(value[key], fn)
            elif fd.is_repeated:
                for item in value:
                    _each_string(item, fn)
            else:
                _each_string(value, fn)


def _kind(spec: task_pb2.TaskSpec) -> Message | None:
    kind = spec.WhichOneof("kind")
    return getattr(spec, kind) if kind else None


def references(spec: task_pb2.TaskSpec) -> Iterator[tuple[str, int | None]]:
    """(text, upstream index) of every `${{ … }}` in the spec; index None when malformed."""
    found: list[tuple[str, int | None]] = []

    def scan(text: str) -> None:
        for m in _ANY_REF.finditer(text):
            ok = _REF.fullmatch(m.group(0))
            found.append((m.group(0), int(ok.group(1)) if ok else None))

    kind = _kind(spec)
    if isinstance(kind, task_pb2.HttpSpec) and kind.headers:
        # `${{ secrets.NAME }}` in a header value is no upstream's: the node fills it in.
        for value in kind.headers.values():
            scan(SECRET_REFERENCE.sub("", value))
        bare = task_pb2.HttpSpec()
        bare.CopyFrom(kind)
        bare.ClearField("headers")
        kind = bare
    if kind is not None:
        _each_string(kind, lambda s: scan(s) if "${{" in s else None)
    return iter(found)


def _value(result: task_pb2.TaskResult, what: str, path: str) -> str:
    if what == "stdout":
        return result.stdout.rstrip("\n")
    if what == "stderr":
        return result.stderr.rstrip("\n")
    if what == "exit_code":
        return str(result.exit_code)
    data: object = json_format.MessageToDict(result.output) if result.HasField("output") else None
    for key in filter(None, path.split(".")):
        data = data.get(key) if isinstance(data, dict) else None
    return data if isinstance(data, str) else json.dumps(_whole_numbers(data))


def _whole_numbers(data: object) -> object:
    """Struct numbers are doubles: show 3.0 as 3."""
    if isinstance(data, float) and data.is_integer():
        return int(data)
    if isinstance(data, dict):
        return {k: _whole_numbers(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_whole_numbers(v) for v in data]
    return data


def render(spec: task_pb2.TaskSpec, results: Sequence[task_pb2.TaskResult]) -> task_pb2.TaskSpec:
    """A copy of `spec` with every reference replaced by the upstream result it names."""
    out = task_pb2.TaskSpec()
    out.CopyFrom(spec)

    def fill(text: str) -> str | None:
        if "${{" not in text:
            return None
        return _REF.sub(lambda m: _value(results[int(m.group(1))], m.group(2), m.group(3)), text)

    if (kind := _kind(out)) is not None:
        _each_string(kind, fill)
    return out
