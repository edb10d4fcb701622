"""Spec builders: `shell(...)`, `python(...)`, `http(...)` and the rest make a TaskSpec in one
call."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from google.protobuf import struct_pb2

from shoal.errors import FieldViolation, InvalidArgument
from shoal.specs import span
from shoal.v1 import task_pb2

__all__ = [
    "PRIORITIES",
    "custom",
    "docker",
    "http",
    "llm",
    "noop",
    "ollama",
    "python",
    "retry",
    "shell",
    "tool",
]

PRIORITIES = {
    "critical": task_pb2.PRIORITY_CRITICAL,
    "high": task_pb2.PRIORITY_HIGH,
    "normal": task_pb2.PRIORITY_NORMAL,
    "low": task_pb2.PRIORITY_LOW,
    "background": task_pb2.PRIORITY_BACKGROUND,
}


def _choice(table: Mapping[str, int], value: str | int, field: str) -> int:
    """`value` looked up by name in `table` (a number passes as it is); InvalidArgument naming
    the names allowed otherwise."""
    if not isinstance(value, str):
        return value
    try:
        return table[value]
    except KeyError:
        allowed = ", ".join(table)
        message = f"{field} must be one of {allowed}, not {value!r}"
        raise InvalidArgument(message, [FieldViolation(field, message)]) from None


def _resources(
    value: task_pb2.ResourceRequest | Mapping[str, float],
) -> task_pb2.ResourceRequest:
    """What a task takes of its node: a ResourceRequest, or {"cpu": 2, "memory_mb": 512,
    "gpus": 1, "slots": 2} (any of them); InvalidArgument for any other key or value."""
    if isinstance(value, task_pb2.ResourceRequest):
        return value
    out = task_pb2.ResourceRequest()
    for key, amount in value.items():
        field = out.DESCRIPTOR.fields_by_name.get(key)
        try:
            if field is None:
                raise ValueError("no such resource (cpu, memory_mb, gpus, slots)")
            if isinstance(amount, bool) or not isinstance(amount, int | float):
                raise ValueError(f"{amount!r} is not a number")
            setattr(out, key, amount if key == "cpu" else _whole(amount))
        except (ValueError, TypeError, OverflowError) as err:
            message = f"resources.{key}: {err}"
            raise InvalidArgument(message, [FieldViolation(f"resources.{key}", message)]) from None
    return out


def _whole(amount: float) -> int:
    if amount != int(amount) or amount < 0:
        raise ValueError(f"{amount!r} is not a whole number of at least 0")
    return int(amount)


def _common(
    spec: task_pb2.TaskSpec,
    *,
    name: str = "",
    priority: str | int = "normal",
    timeout: timedelta | float | None = None,
    idempotency_key: str = "",
    tenant: str = "",
    labels: Mapping[str, str] | None = None,
    metadata: Mapping[str, str] | None = None,
    depends_on: Sequence[int | str | task_pb2.Dependency] = (),
    retry: task_pb2.RetryPolicy | None = None,
    queue_timeout: timedelta | float | None = None,
    not_before: datetime | None = None,
    locks: Sequence[str] = (),
    quota_keys: Sequence[str] = (),
    backend: str = "",
    resources: task_pb2.ResourceRequest | Mapping[str, float] | None = None,
    wait_for_node: bool = False,
) -> task_pb2.TaskSpec:
    spec.name = name
    if resources is not None:
        spec.resources.CopyFrom(_resources(resources))
    spec.wait_for_node = wait_for_node  # else it fails when no connected node can run it
    spec.locks.extend(locks)  # "file:/x" exclusive, "read:file:/x" shared
    spec.quota_keys.extend(quota_keys)
    spec.backend = backend
    spec.priority = _choice(PRIORITIES, priority, "priority")  # type: ignore[assignment]
    if (timeout := span(timeout, "timeout")) is not None:  # a timedelta, or seconds
        spec.timeout.FromTimedelta(timeout)
    spec.idempotency_key = idempotency_key
    spec.tenant = tenant
    spec.required_labels.update(labels or {})
    spec.metadata.update(metadata or {})
    for dep in depends_on:
        if isinstance(dep, task_pb2.Dependency):
            spec.depends_on.append(dep)
        elif isinstance(dep, int):
            spec.depends_on.add(batch_index=dep)  # another task of the same batch
        else:
            spec.depends_on.add(task_id=dep)
    if retry is not None:
        spec.retry.CopyFrom(retry)
    if (queue_timeout := span(queue_timeout, "queue_timeout")) is not None:
        spec.queue_timeout.FromTimedelta(queue_timeout)
    if not_before is not None:
        spec.not_before.FromDatetime(not_before)
    return spec


def retry(
    attempts: int,
    *,
    backoff: timedelta = timedelta(seconds=1),
    max_backoff: timedelta = timedelta(seconds=60),
    multiplier: float = 2.0,
    on_exit: bool = True,
    exit_codes: Sequence[int] = (),
    on_timeout: bool = False,
) -> task_pb2.RetryPolicy:
    """Up to `attempts` in all, backing off exponentially; retries a non-zero exit (all, or
    only `exit_codes`), a timeout when `on_timeout`, and infrastructure failures."""
    policy = task_pb2.RetryPolicy(
        max_attempts=attempts,
        multiplier=multiplier,
        retry_on_exit=on_exit,
        retry_exit_codes=exit_codes,
        retry_on_timeout=on_timeout,
    )
    policy.initial_backoff.FromTimedelta(backoff)
    policy.max_backoff.FromTimedelta(max_backoff)
    return policy


def shell(
    command: str | Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str = "",
    stdin: bytes = b"",
    **common: Any,
) -> task_pb2.TaskSpec:
    """A shell task: a string runs as a /bin/sh script, a sequence as argv (no shell).
    Upstream outputs (`${{ deps[0].stdout }}`) go in `env` values, read as "$NAME"."""
    sh = task_pb2.ShellSpec(env=env or {}, cwd=cwd, stdin=stdin)
    if isinstance(command, str):
        sh.script = command
    else:
        sh.argv.extend(command)
    return _common(task_pb2.TaskSpec(shell=sh), **common)


def python(
    code: str,
    *,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    cwd: str = "",
    stdin: bytes = b"",
    **common: Any,
) -> task_pb2.TaskSpec:
    """Python code run by an isolated interpreter on the node. Upstream outputs
    (`${{ deps[0].stdout }}`) go in `env` values or `args`, never in the code."""
    py = task_pb2.PythonSpec(code=code, args=list(args), env=env or {}, cwd=cwd, stdin=stdin)
    return _common(task_pb2.TaskSpec(python=py), **common)


_PULL_POLICIES = {
    "never": task_pb2.PULL_POLICY_NEVER,
    "if_missing": task_pb2.PULL_POLICY_IF_MISSING,
    "always": task_pb2.PULL_POLICY_ALWAYS,
}


def docker(
    image: str,
    command: Sequence[str] = (),
    *,
    env: Mapping[str, str] | None = None,
    workdir: str = "",
    files: Mapping[str, bytes | str] | None = None,
    cpus: float = 0.0,
    memory_mb: int = 0,
    pids: int = 0,
    pull: str | int = "never",
    network: bool = False,
    **common: Any,
) -> task_pb2.TaskSpec:
    """A container of `image` running `command` (argv; empty: the image's own), sandboxed by its
    node; `files` (absolute paths under /work -> content) are there, read-only, when it starts.
    Upstream outputs (`${{ deps[0].stdout }}`) go in `env` values, or in `command` when it is
    no shell or interpreter."""
    spec = task_pb2.DockerSpec(
        image=image,
        command=list(command),
        env=env or {},
        workdir=workdir,
        files={p: c.encode() if isinstance(c, str) else c for p, c in (files or {}).items()},
        cpus=cpus,
        memory_mb=memory_mb,
        pids=pids,
        pull=_choice(_PULL_POLICIES, pull, "pull"),  # type: ignore[arg-type]
        network=network,
    )
    return _common(task_pb2.TaskSpec(docker=spec), **common)


Message = Mapping[str, str] | task_pb2.ChatMessage
"""A chat message: {"role": "user", "content": "..."} (role: system, user or assistant)."""


def _messages(messages: Sequence[Message]) -> list[task_pb2.ChatMessage]:
    return [
        m if isinstance(m, task_pb2.ChatMessage) else task_pb2.ChatMessage(**m) for m in messages
    ]


def ollama(
    model: str,
    *,
    prompt: str = "",
    messages: Sequence[Message] = (),
    system: str = "",
    options: Mapping[str, Any] | None = None,
    format: str = "",
    **common: Any,
) -> task_pb2.TaskSpec:
    """A model of a node's Ollama server: chat with `messages` (`prompt` then appended as the
    last user message), else generate from `prompt`. Placed on a node that serves `model`;
    its backend is "ollama" unless `backend` says otherwise."""
    spec = task_pb2.OllamaSpec(
        model=model, prompt=prompt, messages=_messages(messages), system=system, format=format
    )
    if options:
        spec.options.update(options)
    common.setdefault("backend", "ollama")
    out = _common(task_pb2.TaskSpec(ollama=spec), **common)
    out.model = model
    return out


def llm(
    provider: str = "",
    model: str = "",
    *,
    prompt: str = "",
    messages: Sequence[Message] = (),
    system: str = "",
    max_tokens: int = 0,
    temperature: float = 0.0,
    routes: Sequence[tuple[str, str] | task_pb2.LlmRoute] = (),
    **common: Any,
) -> task_pb2.TaskSpec:
    """A call to `model` of `provider` ("openai", "anthropic", "gemini" or "ollama"), or, with
    `routes` ((provider, model) pairs, best first) instead, to the first the mesh can serve when
    the task is queued. Its backend is the provider, for breakers and quotas. 0 for
    `max_tokens` or `temperature`: the default."""
    spec = task_pb2.LlmSpec(
        provider=provider,
        model=model,
        prompt=prompt,
        messages=_messages(messages),
        system=system,
        max_tokens=max_tokens,
        temperature=temperature,
        routes=[
            r if isinstance(r, task_pb2.LlmRoute) else task_pb2.LlmRoute(provider=r[0], model=r[1])
            for r in routes
        ],
    )
    if provider:
        common.setdefault("backend", provider)
    out = _common(task_pb2.TaskSpec(llm=spec), **common)
    out.model = model
    return out


def http(
    url: str,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    body: bytes | str = b"",
    **common: Any,
) -> task_pb2.TaskSpec:
    """One HTTP request made by a node whose `http_allow_hosts` admits the host; the status is
    the exit code. A header value may name a secret the task lists: `${{ secrets.NAME }}`."""
    spec = task_pb2.HttpSpec(
        method=method,
        url=url,
        headers=headers or {},
        body=body.encode() if isinstance(body, str) else body,
    )
    return _common(task_pb2.TaskSpec(http=spec), **common)


def custom(
    executor: str, params: Mapping[str, Any] | None = None, **common: Any
) -> task_pb2.TaskSpec:
    """A task for the executor registered as `executor` by a third party, with `params` (JSON)."""
    spec = task_pb2.CustomSpec(executor=executor)
    if params:
        st = struct_pb2.Struct()
        st.update(params)
        spec.params.CopyFrom(st)
    return _common(task_pb2.TaskSpec(custom=spec), **common)


def noop(params: Mapping[str, Any] | None = None, **common: Any) -> task_pb2.TaskSpec:
    """A task that succeeds at once, echoing `params` as its output."""
    return custom("noop", params, **common)


def tool(name: str, input: Mapping[str, Any] | None = None, /, **common: Any) -> task_pb2.TaskSpec:
    """A call of the tool `name` that nodes offer, with `input` (JSON) as its argument.
    Positional, so that `name=` names the task, as in every builder."""
    spec = task_pb2.ToolSpec(name=name)
    if input:
        spec.input.update(input)
    return _common(task_pb2.TaskSpec(tool=spec), **common)
