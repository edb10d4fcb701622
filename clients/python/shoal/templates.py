"""Upstream outputs in a dependent task's spec: `${{ deps[0].stdout }}` and friends.

A dependent task's strings may refer to the results of the tasks it depends on, by their
position in `depends_on`:

    ${{ deps[0].stdout }}        the upstream's stdout tail, without trailing newlines
    ${{ deps[0].stderr }}        likewise stderr
    ${{ deps[0].exit_code }}     its exit code
    ${{ deps[0].output }}        its structured (JSON) result, as JSON
    ${{ deps[0].output.a.b }}    one value inside it: a string as is, anything else as JSON

Upstream values are data, never code: a reference may sit where no interpreter parses it
(env values, argv of a plain program, cwd, HTTP fields, prompts, Struct strings), and is
refused in code or in what picks the code (a script, Python code, the program of an argv,
every argument of a shell or interpreter, an image, a tool). Code reads them from its env.

References are checked at submit time and filled in when the task is dispatched. Every scan
is linear in the size of the spec.

An http task's header values may also name the task's node secrets, `${{ secrets.NAME }}`:
those are no upstream's, and stay as they are for the node to fill in.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import NamedTuple

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from shoal.errors import FieldViolation, InvalidArgument, ResourceExhausted
from shoal.specs import SECRET_REFERENCE
from shoal.v1 import task_pb2

__all__ = ["MAX_MESSAGES", "Reference", "has_references", "is_reference", "references", "render"]

_OPEN, _CLOSE = "${{", "}}"
# Applied only to one span from `${{` to the first `}}` after it (no `}}` inside), which
# keeps it linear; an index has at most 6 digits (depends_on holds far fewer), so int() is cheap.
_REF = re.compile(
    r"\$\{\{\s*deps\[(\d{1,6})\]\.(stdout|stderr|exit_code|output)((?:\.[A-Za-z0-9_-]+)*)\s*\}\}"
)

# Programs that run their arguments as code, or as another command: with one of these as
# argv[0], no argument may come from an upstream. Compared by base name, lower case, without
# a version suffix ("/usr/bin/python3.12" is "python", "bash-5.2" is "bash").
_RUNS_ARGUMENTS = frozenset(
    {
        # shells
        *("sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "yash", "fish", "csh", "tcsh"),
        *("busybox", "toybox", "pwsh", "powershell", "cmd"),
        # interpreters
        *("python", "pypy", "node", "nodejs", "deno", "bun", "perl", "ruby", "php", "lua"),
        *("luajit", "tclsh", "wish", "expect", "rscript", "r", "julia", "osascript", "awk"),
        *("gawk", "mawk", "nawk", "sed", "gsed", "groovy", "java", "jshell", "guile", "racket"),
        *("sbcl", "ocaml", "runghc", "elixir", "escript", "swift", "dotnet", "gdb", "make"),
        # runners of another command
        *("env", "exec", "nice", "nohup", "timeout", "time", "stdbuf", "setsid", "sudo", "doas"),
        *("su", "runuser", "chroot", "unshare", "nsenter", "flock", "ionice", "taskset", "chrt"),
        *("xargs", "find", "watch", "script", "ssh", "docker", "podman", "kubectl", "parallel"),
    }
)

MAX_MESSAGES = 2_000
"""Messages searched for references in one spec: each (a Struct value, a chat message) costs
1-2 µs, so a spec made of them holds the event loop a few ms at most, whatever its size."""


class Reference(NamedTuple):
    """One `${{ … }}` of a spec: the field that holds it (`shell.argv[1]`), its text, the
    upstream's index (None when malformed), and why it may not be there ('' when it may)."""

    field: str
    text: str
    upstream: int | None
    code: str


def _spans(text: str) -> Iterator[tuple[int, int]]:
    """(start, end) of each `${{ … }}` in `text`: from `${{` to the first `}}` after it."""
    start = text.find(_OPEN)
    while start >= 0:
        end = text.find(_CLOSE, start + len(_OPEN))
        if end < 0:
            return  # no `}}` after this `${{`, so none after any later one either
        end += len(_CLOSE)
        yield start, end
        start = text.find(_OPEN, end)


def _strings(
    message: Message, path: str, budget: list[int]
) -> Iterator[tuple[str, str, Callable[[str], None]]]:
    """(field path, text, a setter of it) of every string in `message` that holds `${{`,
    recursively. Map keys and bytes (docker files, stdin, an HTTP body) are never templated.
    Each message visited takes one from `budget`: InvalidArgument when it runs out."""
    budget[0] -= 1
    if budget[0] < 0:
        raise InvalidArgument(
            f"{path}: more than {MAX_MESSAGES} messages to search for references",
            [FieldViolation(path.split(".", 1)[0], f"more than {MAX_MESSAGES} messages")],
        )
    for fd, value in message.ListFields():
        at = f"{path}.{fd.name}"
        if fd.type == FieldDescriptor.TYPE_STRING:
            if fd.is_repeated:
                for i, item in enumerate(value):
                    if _OPEN in item:
                        yield f"{at}[{i}]", item, partial(value.__setitem__, i)
            elif _OPEN in value:
                yield at, value, partial(setattr, message, fd.name)
        elif fd.type == FieldDescriptor.TYPE_MESSAGE and fd.message_type is not None:
            if fd.message_type.GetOptions().map_entry:
                kind = fd.message_type.fields_by_name["value"].type
                if kind == FieldDescriptor.TYPE_MESSAGE:
                    for key, item in value.items():
                        yield from _strings(item, f"{at}[{_key(key)}]", budget)
                elif kind == FieldDescriptor.TYPE_STRING:
                    for key, item in list(value.items()):
                        if _OPEN in item:
                            yield f"{at}[{_key(key)}]", item, partial(value.__setitem__, key)
            elif fd.is_repeated:
                for i, item in enumerate(value):
                    yield from _strings(item, f"{at}[{i}]", budget)
            else:
                yield from _strings(value, at, budget)


def _key(key: object) -> str:
    """A map key in a field path, cut: the path goes into an error message."""
    text = repr(key)
    return text if len(text) <= 40 else f"{text[:37]}...'"


def _runs_arguments(program: str) -> bool:
    name = program.rsplit("/", 1)[-1].lower().removesuffix(".exe")
    # rstrip, not a regex anchored at the end: that one retries at each digit (quadratic).
    return name in _RUNS_ARGUMENTS or name.rstrip("-.0123456789") in _RUNS_ARGUMENTS


def _argv_code(argv: Sequence[str], field: str) -> Callable[[str], str]:
    """Why a reference in element `path` of an argv `field` would be code ('' if it is not)."""
    if argv and _runs_arguments(argv[0]):
        why = f"an argument of {argv[0].rsplit('/', 1)[-1][:40]!r}, which runs it as code"
        return lambda path: why if path.startswith(f"{field}[") else ""
    first = f"{field}[0]"
    return lambda path: "the program to run" if path == first else ""


def _code(kind: str, message: Message) -> Callable[[str], str]:
    """For a spec of `kind`: why a reference in the field at a path would be code ('' if not)."""
    fixed: dict[str, str] = {}
    argv: Callable[[str], str] = lambda path: ""  # noqa: E731
    if isinstance(message, task_pb2.ShellSpec):
        fixed = {"shell.script": "a shell script", "shell.shell": "the shell to run"}
        argv = _argv_code(message.argv, "shell.argv")
    elif isinstance(message, task_pb2.PythonSpec):
        fixed = {"python.code": "Python code"}
    elif isinstance(message, task_pb2.DockerSpec):
        fixed = {"docker.image": "the image to run"}
        argv = _argv_code(message.command, "docker.command")
    elif isinstance(message, task_pb2.ToolSpec):
        fixed = {"tool.name": "the tool to run"}
    elif isinstance(message, task_pb2.FunctionSpec):
        # Its arguments are JSON: text filled in there could give them another shape.
        json = "a function's JSON arguments"
        fixed = {"function.name": "the function to run", "function.args": json}
        fixed["function.kwargs"] = json
    elif isinstance(message, task_pb2.CustomSpec):
        fixed = {"custom.executor": "the executor to run"}
    return lambda path: fixed.get(path) or argv(path)


def references(spec: task_pb2.TaskSpec) -> Iterator[Reference]:
    """Every `${{ … }}` in the spec's kind, in field order; linear in the spec's size.
    InvalidArgument when the kind holds more than MAX_MESSAGES messages (Struct values…)."""
    kind = spec.WhichOneof("kind")
    if kind is None:
        return
    message = getattr(spec, kind)
    code = _code(kind, message)
    for field, text, _ in _strings(message, kind, [MAX_MESSAGES]):
        why = code(field)
        header = field.startswith("http.headers[")
        for start, end in _spans(text):
            if header and SECRET_REFERENCE.fullmatch(text, start, end):
                continue  # the node's secret, which the node fills in
            ok = _REF.fullmatch(text, start, end)
            yield Reference(field, text[start:end], int(ok.group(1)) if ok else None, why)


def is_reference(text: str) -> bool:
    """Whether `text` is one well-formed reference and nothing else."""
    return _REF.fullmatch(text) is not None


def has_references(spec: task_pb2.TaskSpec) -> bool:
    return next(references(spec), None) is not None


def _value(result: task_pb2.TaskResult, what: str, path: str, output: object) -> str:
    """What a reference names; `output`: the result's output as JSON data, for "output"."""
    if what == "stdout":
        return result.stdout.rstrip("\n")
    if what == "stderr":
        return result.stderr.rstrip("\n")
    if what == "exit_code":
        return str(result.exit_code)
    data = output
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


def render(
    spec: task_pb2.TaskSpec, results: Sequence[task_pb2.TaskResult], *, limit: int
) -> task_pb2.TaskSpec:
    """A copy of `spec` with every reference replaced by the upstream result it names (the
    spec passed the checks at submit: each reference is well formed and names an upstream).
    ResourceExhausted when the values filled in come to more than `limit` bytes;
    InvalidArgument when a value for an http header holds a reference of its own."""
    out = task_pb2.TaskSpec()
    out.CopyFrom(spec)
    # Each value, and each output as JSON data, made once however many references name it.
    values: dict[tuple[str, ...], str] = {}
    outputs: dict[str, object] = {}
    added = 0

    def fill(text: str, field: str) -> str:
        nonlocal added
        parts: list[str] = []
        done = 0
        for start, end in _spans(text):
            ok = _REF.fullmatch(text, start, end)
            # Checked at submit, but a spec stored under older rules may still hold these.
            if ok is None or int(ok.group(1)) >= len(results):
                continue
            key = ok.group(1, 2, 3)
            if (value := values.get(key)) is None:
                result = results[int(key[0])]
                if key[1] == "output" and key[0] not in outputs:
                    outputs[key[0]] = (
                        json_format.MessageToDict(result.output)
                        if result.HasField("output")
                        else None
                    )
                value = values[key] = _value(result, key[1], key[2], outputs.get(key[0]))
            if _OPEN in value and field.startswith("http.headers["):
                # The node fills `${{ secrets.NAME }}` in header values: an upstream's output
                # must not choose which of the task's secrets goes where.
                raise InvalidArgument(f"an upstream value for {field} holds '${{{{'")
            # Stopped before it is built: 64 references to 1 MB outputs would make 64 MB.
            added += len(value) if value.isascii() else len(value.encode())
            if added > limit:
                raise ResourceExhausted(f"upstream values over {limit} bytes in all")
            parts += text[done:start], value
            done = end
        return "".join(parts) + text[done:] if parts else text

    if (kind := out.WhichOneof("kind")) is not None:
        for field, text, put in _strings(getattr(out, kind), kind, [MAX_MESSAGES]):
            put(fill(text, field))
    return out
