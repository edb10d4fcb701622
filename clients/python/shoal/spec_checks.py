"""Checks on one submitted spec's own fields, by kind, placement, time and retry: each
violation is named with its field's path (`shoal.validation` checks the batch around it)."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

from shoal._json import loads as json_loads
from shoal.errors import FieldViolation, InvalidArgument
from shoal.specs import duration, instant, secret_references
from shoal.templates import is_reference, references
from shoal.v1 import task_pb2

if TYPE_CHECKING:
    from shoal.validation import Limits

__all__ = ["LLM_PROVIDERS", "TENANT_MAX", "is_import_path", "is_tenant", "spec_violations"]

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_VALUED_OPERATORS = (
    task_pb2.LabelSelector.OPERATOR_UNSPECIFIED,
    task_pb2.LabelSelector.OPERATOR_IN,
    task_pb2.LabelSelector.OPERATOR_NOT_IN,
)
_AUTOMATIC_KEYS = frozenset({"executor", "tenant", "model", "backend"})  # quota keys' prefixes
_SECRET_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")  # also a safe file name


LLM_PROVIDERS = ("ollama", "openai", "anthropic", "gemini")
_PRIORITIES = frozenset(task_pb2.Priority.values())
_SCHEDULING = frozenset(
    {
        "selectors",
        "preferred_labels",
        "resources",
        "routing",
        "hard_affinity",
        "affinity_key",
        "model",
        "depends_on",
        "not_before",
        "queue_timeout",
        "retry",
    }
)
"""The fields _check_scheduling looks at (beyond the references to upstream results)."""
UPSTREAM_DEPTH = 8
"""How deep in an argument (lists, tuples, dict values, dataclass fields) a function call's
upstream result may go: its place is `ARG/STEP/...` (JSON Pointer escapes in each step)."""

_OPERATORS = frozenset(task_pb2.LabelSelector.Operator.values())
_ROUTINGS = frozenset(task_pb2.RoutingStrategy.values())


def _llm_violations(llm: task_pb2.LlmSpec, bad: Callable[[str, str], None]) -> None:
    if llm.routes:
        if llm.provider:
            bad("llm.provider", "set provider and model, or routes, not both")
        for i, r in enumerate(llm.routes):
            if r.provider not in LLM_PROVIDERS:
                bad(
                    f"llm.routes[{i}].provider",
                    f"unknown provider {r.provider!r}: one of {', '.join(LLM_PROVIDERS)}",
                )
            if not r.model:
                bad(f"llm.routes[{i}].model", "missing model")
        return
    if llm.provider not in LLM_PROVIDERS:
        bad("llm.provider", f"unknown provider {llm.provider!r}: one of {', '.join(LLM_PROVIDERS)}")
    if not llm.model:
        bad("llm.model", "missing model")


def spec_violations(
    spec: task_pb2.TaskSpec,
    at: str,
    limits: Limits,
    present: Collection[str],
    encoded: bytes,
) -> list[FieldViolation]:
    """What is wrong with one spec; `present`: the fields it sets, `encoded`: it serialized."""
    out: list[FieldViolation] = []

    def bad(path: str, why: str) -> None:
        out.append(FieldViolation(f"{at}.{path}" if at else path, why))

    # Most fields are unset in most specs: only those set are looked at.
    kind = spec.WhichOneof("kind")
    if kind is None:
        bad(
            "kind",
            "missing task kind: set one of shell, python, docker, ollama, llm, http, tool, custom",
        )
    elif kind == "shell":
        sh = spec.shell
        if not sh.argv and not sh.script:
            bad("shell", "empty command: set argv or script")
        elif sh.argv and sh.script:
            bad("shell", "set argv or script, not both")
        elif sh.argv and not sh.argv[0]:
            bad("shell.argv", "argv[0] is empty")
    elif kind == "python":
        if not spec.python.code.strip():
            bad("python.code", "empty code")
    elif kind == "custom":
        if not spec.custom.executor:
            bad("custom.executor", "missing executor name")
    elif kind == "docker" and not spec.docker.image:
        bad("docker.image", "missing image")
    elif kind == "llm":
        _llm_violations(spec.llm, bad)
    elif kind == "ollama" and not spec.ollama.model:
        bad("ollama.model", "missing model")
    elif kind == "http" and not spec.http.url:
        bad("http.url", "missing url")
    elif kind == "tool" and not spec.tool.name:
        bad("tool.name", "missing tool name")
    elif kind == "function":
        _function_violations(spec.function, limits, bad)
    if "priority" in present and spec.priority not in _PRIORITIES:
        bad("priority", f"unknown priority {spec.priority}")
    if "timeout" in present:
        try:
            duration(spec.timeout, "timeout", positive=True)
        except InvalidArgument as err:
            bad("timeout", err.message)
    for name in ("name", "idempotency_key", "tenant", "backend"):
        if name not in present:
            continue
        text = getattr(spec, name)
        if len(text) > limits.max_string:
            bad(name, f"longer than {limits.max_string} characters")
        elif not text.isprintable():
            bad(name, "must be printable text")
        elif name == "tenant" and not is_tenant(text):
            bad(name, "has no '/'")
    maps = {
        name: getattr(spec, name) for name in ("required_labels", "metadata") if name in present
    }
    if kind in ("shell", "python", "docker"):
        maps[f"{kind}.env"] = getattr(spec, kind).env
        _process_violations(kind, getattr(spec, kind), bad)
    for name, entries in maps.items():
        if not entries:
            continue
        if len(entries) > limits.max_labels:
            bad(name, f"more than {limits.max_labels} entries")
        elif any(len(k) > limits.max_string for k in entries):
            bad(name, f"a key longer than {limits.max_string} characters")
        elif name == "required_labels" and any(
            len(v) > limits.max_string for v in entries.values()
        ):
            bad(name, f"a value longer than {limits.max_string} characters")
        elif name == "required_labels" and not all(
            k and k.isprintable() and v.isprintable() for k, v in entries.items()
        ):
            bad(name, "keys and values are printable text; a key is not empty")
    if "secrets" in present:
        _check_secrets(spec, kind, limits, bad)
    for field in ("locks", "quota_keys"):
        if field not in present:
            continue
        names = getattr(spec, field)
        if len(names) > limits.max_labels:
            bad(field, f"more than {limits.max_labels} entries")
        for i, name in enumerate(names):
            if not name.removeprefix("read:") if field == "locks" else not name:
                bad(f"{field}[{i}]", "names nothing")
            elif len(name) > limits.max_string or not name.isprintable():
                bad(f"{field}[{i}]", f"must be printable, at most {limits.max_string} characters")
            elif field == "quota_keys" and name.partition(":")[0] in _AUTOMATIC_KEYS:
                # Another tenant's key would spend that tenant's quota.
                bad(
                    f"{field}[{i}]",
                    f"{name.partition(':')[0]}: keys are added by the coordinator, from the"
                    " task's own executor, tenant, model and backend",
                )
    _check_scheduling(spec, present, encoded, limits, bad)
    return out


# The strings of a process spec that become a command line, a directory or an environment,
# which end at a NUL.
_PROCESS_TEXTS = {
    "shell": ("argv", "script", "shell", "cwd"),
    "python": ("code", "args", "cwd"),
    "docker": ("image", "command", "workdir"),
}


def _process_violations(kind: str, spec: Any, bad: Callable[[str, str], None]) -> None:
    """What no process can be started with: a NUL in its command, directory or environment,
    or a variable whose name is empty or holds '='."""
    for field in _PROCESS_TEXTS[kind]:
        value = getattr(spec, field)
        if any("\0" in text for text in ([value] if isinstance(value, str) else value)):
            bad(f"{kind}.{field}", "holds a NUL character")
    for name, value in spec.env.items():
        if not name or "=" in name or "\0" in name:
            bad(f"{kind}.env", f"{name[:40]!r} is not an environment variable name")
        elif "\0" in value:
            bad(f"{kind}.env[{name[:40]!r}]", "holds a NUL character")


def _check_secrets(
    spec: task_pb2.TaskSpec, kind: str | None, limits: Limits, bad: Callable[[str, str], None]
) -> None:
    if len(spec.secrets) > limits.max_labels:
        bad("secrets", f"more than {limits.max_labels} entries")
    if kind == "function":
        # Its warm worker process serves every call of the function, whoever made it: a
        # secret put in its environment would outlive the call.
        bad("secrets", "a function call takes no secrets (its worker serves every call)")
        return
    seen = set(getattr(spec, kind).env) if kind in ("shell", "python", "docker") else set()
    for i, ref in enumerate(spec.secrets):
        env = ref.env or ref.name
        if not _SECRET_NAME.match(ref.name) or len(ref.name) > limits.max_string:
            bad(
                f"secrets[{i}].name",
                f"must be 1-{limits.max_string} letters, digits, '_', '.' or '-'",
            )
        elif not _ENV_NAME.match(env):
            bad(f"secrets[{i}].env", f"{env!r} is not an environment variable name")
        elif env in seen:
            bad(f"secrets[{i}].env", f"{env!r} is set twice (by the spec's env or a secret)")
        seen.add(env)


def _check_references(
    spec: task_pb2.TaskSpec, limits: Limits, bad: Callable[[str, str], None]
) -> None:
    """Each field with a reference that is malformed, names no upstream, or sits in code is
    named once; a spec holds at most `limits.max_labels` references (each is filled at
    dispatch), so the scan stops at the first beyond."""
    named: set[str] = set()
    try:
        for count, ref in enumerate(references(spec), 1):
            if count > limits.max_labels:
                bad(spec.WhichOneof("kind") or "kind", f"more than {limits.max_labels} references")
                return
            if ref.field in named:
                continue
            if ref.code:
                named.add(ref.field)
                where = (
                    "a value of function.upstream, e.g. {'0': '${{ deps[0].output.value }}'}"
                    " (as a handle passed as an argument makes)"
                    if ref.field.startswith("function.")
                    else "an env value, e.g. env={'X': '${{ deps[0].stdout }}'}, and read the"
                    " variable X"
                )
                bad(ref.field, f"an upstream reference may not be in {ref.code}: put it in {where}")
            elif ref.upstream is None:
                named.add(ref.field)
                bad(
                    ref.field,
                    f"{ref.text[:80]!r} is malformed: a reference is ${{{{ deps[N].stdout }}}},"
                    " .stderr, .exit_code, .output or .output.key.path",
                )
            elif ref.upstream >= len(spec.depends_on):
                named.add(ref.field)
                bad(ref.field, f"{ref.text[:80]!r} names no upstream task of depends_on")
    except InvalidArgument as err:  # too many messages to search
        for v in err.violations:
            bad(v.field, v.description)


def _check_scheduling(
    spec: task_pb2.TaskSpec,
    present: Collection[str],
    encoded: bytes,
    limits: Limits,
    bad: Callable[[str, str], None],
) -> None:
    """Placement, dependency, time and retry fields (those `present`); reports through `bad`."""
    # Walking every string is dear; the serialized spec tells first if any could refer.
    if b"${{" in encoded:
        _check_references(spec, limits, bad)
        listed = {ref.name for ref in spec.secrets}
        for secret in secret_references(spec):
            if secret not in listed:
                bad("http.headers", f"secret {secret[:80]!r} is not one of the task's secrets")
    if _SCHEDULING.isdisjoint(present):
        return
    for i, sel in enumerate(spec.selectors):
        if not sel.key or len(sel.key) > limits.max_string:
            bad(f"selectors[{i}].key", f"must be 1-{limits.max_string} characters")
        if sel.operator not in _OPERATORS:
            bad(f"selectors[{i}].operator", f"unknown operator {sel.operator}")
        if len(sel.values) > limits.max_labels:
            bad(f"selectors[{i}].values", f"more than {limits.max_labels} values")
        elif not sel.values and sel.operator in _VALUED_OPERATORS:
            bad(f"selectors[{i}].values", "IN and NOT_IN need at least one value")
    if len(spec.selectors) > limits.max_labels:
        bad("selectors", f"more than {limits.max_labels} selectors")
    if len(spec.preferred_labels) > limits.max_labels:
        bad("preferred_labels", f"more than {limits.max_labels} entries")
    for i, pref in enumerate(spec.preferred_labels):
        if not math.isfinite(pref.weight) or pref.weight < 0:
            bad(f"preferred_labels[{i}].weight", "must be a finite number >= 0")
    res = spec.resources
    if not math.isfinite(res.cpu) or res.cpu < 0 or res.cpu > 1e6:
        bad("resources.cpu", "must be between 0 and 1e6 cores")
    if spec.routing not in _ROUTINGS:
        bad("routing", f"unknown routing strategy {spec.routing}")
    if spec.hard_affinity and not spec.affinity_key:
        bad("hard_affinity", "needs an affinity_key")
    if len(spec.affinity_key) > limits.max_string or len(spec.model) > limits.max_string:
        bad("affinity_key" if spec.affinity_key else "model", "too long")
    if len(spec.depends_on) > limits.max_depends_on:
        bad("depends_on", f"more than {limits.max_depends_on} upstream tasks")
    for i, dep in enumerate(spec.depends_on):
        if dep.WhichOneof("ref") is None or (dep.HasField("task_id") and not dep.task_id):
            bad(f"depends_on[{i}]", "set task_id or batch_index")
    if spec.HasField("not_before"):
        try:
            instant(spec.not_before, "not_before")
        except InvalidArgument as err:
            bad("not_before", err.violations[0].description)
    if spec.HasField("queue_timeout"):
        try:
            duration(spec.queue_timeout, "queue_timeout", positive=True)
        except InvalidArgument as err:
            bad("queue_timeout", err.message)
    retry = spec.retry
    if retry.max_attempts > limits.max_attempts:
        bad("retry.max_attempts", f"at most {limits.max_attempts}")
    for name in ("initial_backoff", "max_backoff"):
        if retry.HasField(name):
            try:
                duration(getattr(retry, name), f"retry.{name}")
            except InvalidArgument as err:
                bad(f"retry.{name}", err.message)
    if not math.isfinite(retry.multiplier) or not (retry.multiplier == 0 or retry.multiplier >= 1):
        bad("retry.multiplier", "must be at least 1 (0: the default, 2)")


TENANT_MAX = 256
"""The longest tenant name (Limits.max_string by default)."""


def is_tenant(name: str) -> bool:
    """Whether `name` may name a tenant: printable, at most TENANT_MAX characters, no '/' (a
    tenant's locks are named `tenant/<tenant>/<lock>`: tenants "a" and "a/b" would share)."""
    return len(name) <= TENANT_MAX and name.isprintable() and "/" not in name


@functools.lru_cache(maxsize=1024)  # a batch's calls name a few functions, thousands of times
def is_position(key: str) -> bool:
    """Whether an upstream place is a position: a number in ASCII digits, written as str(int)
    writes it (str.isdigit takes "²" and "٠" too, and int() takes "007")."""
    return key.isascii() and key.isdigit() and (key == "0" or key[0] != "0")


def is_import_path(name: str) -> bool:
    """Whether `name` is `package.module:qualname`."""
    module, _, qualname = name.partition(":")
    return all(part.isidentifier() for part in (*module.split("."), *qualname.split(".")))


def _function_violations(
    f: task_pb2.FunctionSpec, limits: Limits, bad: Callable[[str, str], None]
) -> None:
    """A function's name is an import path (`package.module:qualname`), its arguments a JSON
    array and a JSON object (as its workers take them), its upstream arguments positions
    within the array or identifiers."""
    if not f.name:
        bad("function.name", "missing function name")
    elif len(f.name) > limits.max_string or not is_import_path(f.name):
        bad("function.name", "must be an import path: package.module:qualname")
    args = _json_argument(f.args, list, "function.args", bad)
    _json_argument(f.kwargs, dict, "function.kwargs", bad)
    if len(f.upstream) > limits.max_labels:
        bad("function.upstream", f"more than {limits.max_labels} entries")
    for key, value in f.upstream.items():
        head, *path = key.split("/")
        if not is_reference(value):
            # One value in one place: text around a reference could give it another shape.
            bad(f"function.upstream[{key[:40]!r}]", "must be one reference and nothing else")
        if not (is_position(head) and len(head) <= 6) and not head.isidentifier():
            bad("function.upstream", f"{key[:40]!r} is neither a position nor an argument name")
        elif len(path) > UPSTREAM_DEPTH or len(key) > limits.max_string:
            bad("function.upstream", f"{key[:40]!r}: a path deeper than {UPSTREAM_DEPTH}")
        elif is_position(head) and args is not None and int(head) >= len(args):
            bad("function.upstream", f"{key[:40]!r}: args has no position {head}")


def _json_argument(
    data: str, kind: type, field: str, bad: Callable[[str, str], None]
) -> Any | None:
    """The value of a function's `args` or `kwargs` (None when empty or refused): JSON of
    `kind`, a list or a dict."""
    if not data:
        return None
    try:
        value = json_loads(data, lone_surrogates=True)
    except (ValueError, RecursionError) as err:
        bad(field, f"not JSON: {str(err)[:200]}")
        return None
    if not isinstance(value, kind):
        bad(field, f"must be a JSON {'array' if kind is list else 'object'}")
        return None
    return value
