"""The task options of `run`, `submit` and `schedule create`, and the specs they build."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from google.protobuf import json_format

from shoal import _builders, _json
from shoal.cli.app import duration, parse_labels
from shoal.spec_checks import is_import_path
from shoal.v1 import task_pb2


def _at(text: str | None) -> datetime | None:
    """`--at`: an ISO time (local unless it says otherwise), or +SECONDS from now."""
    if text is None:
        return None
    try:
        if text.startswith("+"):
            return datetime.now(UTC) + timedelta(seconds=float(text[1:]))
        when = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"expected an ISO time or +SECONDS, got {text!r}") from None
    return when if when.tzinfo else when.astimezone()


def build_spec(
    command: list[str],
    python_code: str | None,
    *,
    name: str,
    priority: str,
    timeout: float | None,
    label: list[str] | None,
    key: str,
    tenant: str,
    after: list[str] | None,
    retries: int,
    queue_timeout: float | None,
    at: str | None,
    docker: str | None = None,
    http: str | None = None,
    method: str = "GET",
    tool: str | None = None,
    tool_input: str | None = None,
    function: str | None = None,
) -> task_pb2.TaskSpec:
    if priority not in _builders.PRIORITIES:
        raise typer.BadParameter(f"priority must be one of {', '.join(_builders.PRIORITIES)}")
    kinds = [
        k
        for k, v in (
            ("--python", python_code),
            ("--docker", docker),
            ("--http", http),
            ("--tool", tool),
            ("--function", function),
        )
        if v is not None
    ]
    if len(kinds) > 1:
        raise typer.BadParameter(f"give one of {', '.join(kinds)}")
    if tool_input is not None and tool is None and function is None:
        raise typer.BadParameter("--input goes with --tool or --function")
    common: dict[str, Any] = dict(
        name=name,
        priority=priority,
        timeout=duration(timeout),
        labels=parse_labels(label or []),
        idempotency_key=key,
        tenant=tenant,
        depends_on=after or [],
        retry=_builders.retry(retries + 1) if retries else None,
        queue_timeout=duration(queue_timeout),
        not_before=_at(at),
    )
    if python_code is not None:
        return _builders.python(python_code, args=command, **common)
    if docker is not None:
        return _builders.docker(docker, command, **common)
    if command and (http is not None or tool is not None or function is not None):
        raise typer.BadParameter("--http, --tool and --function take no command")
    if http is not None:
        return _builders.http(http, method=method, **common)
    if tool is not None:
        return _builders.tool(tool, _json_object(tool_input or "{}", "--input"), **common)
    if function is not None:
        return _function_call(function, tool_input or "[]", common)
    if not command:
        raise typer.BadParameter(
            "give a command after --, or --python CODE, --docker IMAGE, --http URL,"
            " --tool NAME or --function PATH"
        )
    return _builders.shell(command, **common)


def _function_call(path: str, arguments: str, common: dict[str, Any]) -> task_pb2.TaskSpec:
    """A call of the `@shoal.task` function at `path` with `arguments`: a JSON array of the
    positional ones, or an object of keyword ones (typed by the function, on the node)."""
    if not is_import_path(path):
        raise typer.BadParameter(
            f"--function: {path!r} is not an import path (package.module:name)"
        )
    value = _parse_json(arguments, "--input")
    if not isinstance(value, list | dict):
        raise typer.BadParameter(
            "--input of --function: a JSON array of arguments, or an object of keyword ones"
        )
    call = task_pb2.FunctionSpec(name=path)
    if isinstance(value, list):
        call.args = _json.dumps(value).decode()
    else:
        call.kwargs = _json.dumps(value).decode()
    common["name"] = common["name"] or path.rpartition(":")[2]
    return _builders._common(task_pb2.TaskSpec(function=call), **common)


def _parse_json(text: str, option: str) -> Any:
    try:
        return _json.loads(text, lone_surrogates=True)
    except (ValueError, RecursionError) as err:
        raise typer.BadParameter(f"{option}: not JSON: {err}") from None


def _json_object(text: str, option: str) -> dict[str, Any]:
    value = _parse_json(text, option)
    if not isinstance(value, dict):
        raise typer.BadParameter(f"{option}: expected a JSON object, got {type(value).__name__}")
    return value


NameOpt = Annotated[str, typer.Option(help="Task name")]
PriorityOpt = Annotated[str, typer.Option(help="critical|high|normal|low|background")]
TimeoutOpt = Annotated[float | None, typer.Option(help="Execution timeout in seconds", min=0.0)]
LabelOpt = Annotated[list[str] | None, typer.Option("--label", "-l", help="Required node label")]
PythonOpt = Annotated[str | None, typer.Option("--python", help="Run Python code instead")]
DockerOpt = Annotated[
    str | None,
    typer.Option("--docker", help="Run the command (after --) in a container of this image"),
]
HttpOpt = Annotated[str | None, typer.Option("--http", help="Make one HTTP request to this URL")]
MethodOpt = Annotated[str, typer.Option(help="The --http request's method")]
ToolOpt = Annotated[str | None, typer.Option("--tool", help="Call the tool of this name")]
InputOpt = Annotated[
    str | None,
    typer.Option(
        "--input",
        help="The --tool call's input (JSON), or the --function call's arguments (a JSON array,"
        " or an object of keyword arguments)",
    ),
]
FunctionOpt = Annotated[
    str | None,
    typer.Option(
        "--function", help="Call the @shoal.task function of this import path (package.module:name)"
    ),
]
KeyOpt = Annotated[str, typer.Option("--key", help="Idempotency key")]
TenantOpt = Annotated[str, typer.Option(help="Tenant")]
AfterOpt = Annotated[
    list[str] | None, typer.Option("--after", help="Run after this task succeeds (repeatable)")
]
RetriesOpt = Annotated[int, typer.Option(help="Retry a failure up to N times, backing off", min=0)]
QueueTimeoutOpt = Annotated[
    float | None, typer.Option(help="Time out if not started within SECONDS", min=0.0)
]
AtOpt = Annotated[str | None, typer.Option(help="Not before this ISO time, or +SECONDS")]


def read_specs(file: Path) -> list[task_pb2.TaskSpec]:
    """`--file`: one TaskSpec (proto JSON) or a list of them."""
    try:
        loaded = json.loads(file.read_text())
    except OSError as err:
        raise typer.BadParameter(f"{file}: {err.strerror}") from None
    except (ValueError, RecursionError) as err:
        raise typer.BadParameter(f"{file}: not JSON (or nested too deep): {err}") from None
    items = loaded if isinstance(loaded, list) else [loaded]
    specs = []
    for i, item in enumerate(items):
        where = f"{file}" + (f" [{i}]" if isinstance(loaded, list) else "")
        if not isinstance(item, dict):
            raise typer.BadParameter(
                f"{where}: expected a TaskSpec object (or a list of them), got"
                f" {type(item).__name__}"
            )
        try:
            specs.append(json_format.ParseDict(item, task_pb2.TaskSpec()))
        except (json_format.ParseError, RecursionError) as err:
            raise typer.BadParameter(f"{where}: {err}") from None
    if not specs:
        raise typer.BadParameter(f"{file}: no tasks in it")
    return specs
