"""`@shoal.task`: a Python function that nodes run, called remotely through handles.

@shoal.task(retries=3)
def resize(path: str, width: int) -> Size: ...

handle = resize.submit(client, "a.png", 640)   # a task on a node that imports the module
size = handle.result()                         # a Size, or the remote error raised
sizes = shoal.gather(resize.map(client, paths, widths))   # one SubmitBatch
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

from shoal._builders import _common, retry
from shoal._codec import (
    SCALARS,
    UPSTREAM,
    CallCodec,
    CodecError,
    Untyped,
    check_importable,
    import_path,
    place_step,
)
from shoal._requests import Timeout
from shoal.errors import RemoteError, TaskFailed
from shoal.spec_checks import UPSTREAM_DEPTH
from shoal.specs import FINAL_STATES
from shoal.v1 import task_pb2
from shoal.validation import Limits

if TYPE_CHECKING:
    from shoal._blocking import Client
    from shoal._client import AsyncClient

__all__ = ["AsyncFunction", "AsyncHandle", "Function", "Handle", "async_gather", "gather", "task"]

P = ParamSpec("P")
R = TypeVar("R")
_OPTIONS = frozenset(inspect.signature(_common).parameters) - {"spec"}
"""The task options `@task` takes (the spec builders'), besides `retries`."""


def _reference(index: int) -> str:
    return f"${{{{ deps[{index}].output.value }}}}"


class Function(Generic[P, R]):
    """A function nodes can run: call it to run it here, `submit` or `map` to run it remotely.

    `defaults` are the task options of the spec builders (priority, timeout, labels, retry,
    locks, quota_keys, backend, ...), plus `retries` (attempts after the first, on any
    failure of the function) for short.
    """

    def __init__(self, fn: Callable[P, R], *, name: str | None = None, **defaults: Any) -> None:
        self.fn = fn
        self.name = name or import_path(fn)
        self.codec = CallCodec(fn)
        try:  # said when it is sent to a node (it may be meant to run only here)
            check_importable(self.name)
            self._not_importable = ""
        except CodecError as err:
            self._not_importable = str(err)
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise TypeError(
                f"@shoal.task: {fn.__qualname__} is a generator function; a task returns one"
                " value (return a list)"
            )
        retries = defaults.pop("retries", None)
        if retries is not None and "retry" not in defaults:
            defaults["retry"] = retry(int(retries) + 1, backoff=timedelta(milliseconds=100))
        self.defaults = defaults
        self._template = self._made_template()  # a misspelt or bad option: said here
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<shoal function {self.name}>"

    def options(self, **defaults: Any) -> Function[P, R]:
        """This function with other task options (merged over its own); `name` names its
        tasks (the function keeps its own name, its import path)."""
        merged = {**self.defaults, **defaults}
        if "retries" in defaults and "retry" not in defaults:
            merged.pop("retry", None)  # made again from the new retries
        task_name = merged.pop("name", None)
        made: Function[P, R] = _made(self.fn, self.name, merged)
        if task_name is not None:
            made.defaults["name"] = task_name
            made._template = made._made_template()
        return made

    def spec(self, *args: Any, **kwargs: Any) -> task_pb2.TaskSpec:
        """The TaskSpec of one call; a handle among the arguments (or in a list, tuple, dict
        value or dataclass field of one) becomes a dependency whose typed result arrives in
        its place."""
        if self._not_importable:
            raise CodecError(self._not_importable)
        if not kwargs and (as_is := self.codec.encode_as_is(args)) is not None:
            out = task_pb2.TaskSpec()  # most calls: the template and their arguments
            out.CopyFrom(self._template)
            if args:
                out.function.args = as_is.decode()
            return out
        self.codec.check(args, kwargs)
        out, encoded_args, encoded_kwargs = self._lifted(args, kwargs)
        if args:
            out.function.args = encoded_args.decode()
        if kwargs:
            out.function.kwargs = encoded_kwargs.decode()
        return out

    def _lifted(
        self, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> tuple[task_pb2.TaskSpec, bytes, bytes]:
        """The spec of a call whose arguments may hold handles (in them, too), each made a
        dependency, and its arguments encoded."""
        lifter = _Lifter()
        plain_args = [lifter.argument(str(i), a) for i, a in enumerate(args)]
        plain_kwargs = {k: lifter.argument(k, v) for k, v in kwargs.items()}
        try:
            encoded_args, encoded_kwargs = self.codec.encode_arguments(plain_args, plain_kwargs)
        except CodecError as err:
            if lifter.cut:
                raise CodecError(
                    f"{err} (handles are found only {UPSTREAM_DEPTH} levels deep in an"
                    f" argument, and in its first {MAX_SEARCHED:,} values)"
                ) from None
            raise
        out = task_pb2.TaskSpec()
        if lifter.deps:
            common = dict(self.defaults)
            common["depends_on"] = [*lifter.deps, *common.get("depends_on", ())]
            common.setdefault("name", self.fn.__name__)
            _common(out, **common)
            out.function.name = self.name
            out.function.upstream.update(lifter.upstream)
        else:
            out.CopyFrom(self._template)
        return out, encoded_args, encoded_kwargs

    def _made_template(self) -> task_pb2.TaskSpec:
        """The spec of a call with no handles, but its arguments (built once: `map` makes
        thousands); TypeError for an option the builders do not have, InvalidArgument for a
        bad value of one."""
        common = dict(self.defaults)
        common.setdefault("name", self.fn.__name__)
        if unknown := sorted(set(common) - _OPTIONS):
            raise TypeError(
                f"@shoal.task on {self.fn.__qualname__}: no task option {', '.join(unknown)}"
                f" (options: retries, {', '.join(sorted(_OPTIONS))})"
            )
        return _common(task_pb2.TaskSpec(function=task_pb2.FunctionSpec(name=self.name)), **common)

    def submit(self, client: Client, /, *args: Any, **kwargs: Any) -> Handle[R]:
        """Run it on a node; returns at once with a handle to its result."""
        task = client.submit(self.spec(*args, **kwargs))
        return Handle(self, client, task.id, task.created_seq)

    async def async_submit(
        self, client: AsyncClient, /, *args: Any, **kwargs: Any
    ) -> AsyncHandle[R]:
        task = await client.submit(self.spec(*args, **kwargs))
        return AsyncHandle(self, client, task.id, task.created_seq)

    def call(self, client: Client, /, *args: Any, **kwargs: Any) -> R:
        """Run it on a node and wait for it, in one call: the typed value, or RemoteError /
        TaskFailed."""
        return self.outcome(client.execute(self.spec(*args, **kwargs)))

    async def async_call(self, client: AsyncClient, /, *args: Any, **kwargs: Any) -> R:
        return self.outcome(await client.execute(self.spec(*args, **kwargs)))

    def map(self, client: Client, /, *iterables: Iterable[Any]) -> list[Handle[R]]:
        """One call per item (zipped, as the builtin map), submitted in batches of MAP_BATCH
        (one SubmitBatch for most maps; each batch goes whole or not at all)."""
        specs = [self.spec(*items) for items in zip(*iterables, strict=False)]
        ids = [i for batch in _batches(specs) for i in client.submit_batch(batch)]
        seq = client.get(ids[0]).created_seq if ids else 0
        return [Handle(self, client, i, seq) for i in ids]

    async def async_map(
        self, client: AsyncClient, /, *iterables: Iterable[Any]
    ) -> list[AsyncHandle[R]]:
        specs = [self.spec(*items) for items in zip(*iterables, strict=False)]
        ids = [i for batch in _batches(specs) for i in await client.submit_batch(batch)]
        seq = (await client.get(ids[0])).created_seq if ids else 0
        return [AsyncHandle(self, client, i, seq) for i in ids]

    def outcome(self, task: task_pb2.Task | task_pb2.Event) -> R:
        """The typed result of a final task (or of the Watch event of its end), or its failure
        raised (RemoteError when the function raised)."""
        if task.state == task_pb2.TASK_STATE_SUCCEEDED:
            value = task.result.output.fields.get("value")
            if value is not None:
                result: R = self.codec.decode_result(value.string_value)
                return result
        if isinstance(task, task_pb2.Event):
            task = task_pb2.Task(id=task.task_id, state=task.state, result=task.result)
        raise TaskFailed(task) if task.state == task_pb2.TASK_STATE_SUCCEEDED else failure(task)


MAP_BATCH = Limits().max_batch
"""Calls `map` submits in one SubmitBatch at most (what a coordinator takes by default)."""


def _batches(specs: list[task_pb2.TaskSpec]) -> list[list[task_pb2.TaskSpec]]:
    return [specs[at : at + MAP_BATCH] for at in range(0, len(specs), MAP_BATCH)]


MAX_SEARCHED = 10_000
"""Values of one call's arguments looked through for handles (beyond: not searched)."""


class _Lifter:
    """Takes the handles out of a call's arguments, down to UPSTREAM_DEPTH levels in lists,
    tuples, dict values and dataclass fields: each becomes a dependency whose result the
    worker puts back in its place."""

    def __init__(self) -> None:
        self.upstream: dict[str, str] = {}
        self.deps: list[str] = []
        self.searched = 0
        self.cut = False  # some values were not searched

    def argument(self, key: str, value: Any) -> Any:
        if type(value) in SCALARS:  # most arguments: nothing in them to take out
            return value
        if isinstance(value, (Handle, AsyncHandle)):
            self._take(key, value)
            return UPSTREAM
        lifted, held = self._lift(key, value, 0)
        return Untyped(lifted) if held else value

    def _take(self, place: str, handle: Handle[Any] | AsyncHandle[Any]) -> None:
        self.upstream[place] = _reference(len(self.deps))
        self.deps.append(handle.task_id)

    def _lift(self, place: str, value: Any, depth: int) -> tuple[Any, bool]:
        """`value` with its handles taken out (None in their place), and whether it had any."""
        if isinstance(value, (Handle, AsyncHandle)):
            self._take(place, value)
            return None, True
        if isinstance(value, (list, tuple)):
            items: Any = enumerate(value)
        elif isinstance(value, dict):
            items = value.items()
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            items = ((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
        else:
            return value, False
        if depth >= UPSTREAM_DEPTH:
            self.cut = True
            return value, False
        out: dict[Any, Any] = {}
        held = False
        for key, item in items:
            self.searched += 1
            if self.searched > MAX_SEARCHED:
                self.cut = True
                out[key] = item
                continue
            out[key], had = self._lift(f"{place}/{place_step(str(key))}", item, depth + 1)
            held = held or had
        if not held:
            return value, False
        return (list(out.values()) if isinstance(value, (list, tuple)) else out), True


def failure(task: task_pb2.Task) -> TaskFailed:
    """How a function task that did not succeed is raised."""
    exc = task.result.output.fields.get("exception")
    if exc is None or not exc.HasField("struct_value"):
        return TaskFailed(task)
    f = exc.struct_value.fields
    return RemoteError(
        task,
        f["type"].string_value if "type" in f else "",
        f["message"].string_value if "message" in f else "",
        f["traceback"].string_value if "traceback" in f else "",
    )


class Handle(Generic[R]):
    """A submitted call: `result()` waits for its typed value; pass it as another call's
    argument to run that call after it, with this result."""

    def __init__(self, function: Function[Any, R], client: Client, task_id: str, seq: int) -> None:
        self.function = function
        self.client = client
        self.task_id = task_id
        self.created_seq = seq

    def __repr__(self) -> str:
        return f"<Handle {self.function.name} task={self.task_id}>"

    def result(self, timeout: Timeout = None) -> R:
        """Wait for it; the typed value, or RemoteError / TaskFailed (WaitTimeout after
        `timeout`)."""
        return self.function.outcome(self.client.wait(self.task_id, timeout=timeout))

    def cancel(self) -> task_pb2.Task:
        return self.client.cancel(self.task_id)

    def task(self) -> task_pb2.Task:
        """The task as it is now (state, progress)."""
        return self.client.get(self.task_id)


class AsyncHandle(Generic[R]):
    """Handle, for AsyncClient."""

    def __init__(
        self, function: Function[Any, R], client: AsyncClient, task_id: str, seq: int
    ) -> None:
        self.function = function
        self.client = client
        self.task_id = task_id
        self.created_seq = seq

    def __repr__(self) -> str:
        return f"<AsyncHandle {self.function.name} task={self.task_id}>"

    async def result(self, timeout: Timeout = None) -> R:
        task = await self.client.wait(self.task_id, timeout=timeout)
        return self.function.outcome(task)

    async def cancel(self) -> task_pb2.Task:
        return await self.client.cancel(self.task_id)

    async def task(self) -> task_pb2.Task:
        return await self.client.get(self.task_id)


async def _outcomes(
    client: AsyncClient, handles: Sequence[Handle[R] | AsyncHandle[R]], since: int
) -> list[R]:
    """Each handle's typed result, in order (the first failure raised), from one Watch since
    `since`: each is typed as its event arrives, while the others still run."""
    functions = {h.task_id: h.function for h in handles}
    settled: dict[str, tuple[bool, Any]] = {}  # by task id: (typed, the value or the error)
    if not functions:
        return []
    async for event in client.watch(since=since, states=FINAL_STATES):
        task_id = event.task_id
        function = functions.get(task_id)
        if function is None or task_id in settled:
            continue
        try:
            settled[task_id] = (True, function.outcome(event))
        except Exception as err:  # raised in its turn, if no failure comes before it
            settled[task_id] = (False, err)
        if len(settled) == len(functions):
            break
    results: list[R] = []
    for handle in handles:
        typed, value = settled[handle.task_id]
        if not typed:
            raise value
        results.append(value)
    return results


async def async_gather(handles: Sequence[AsyncHandle[R]]) -> list[R]:
    """Every handle's typed result, in order (the first failure raised), from one Watch."""
    if not handles:
        return []
    since = max(0, min(h.created_seq for h in handles) - 1)
    return await _outcomes(handles[0].client, handles, since)


def gather(handles: Sequence[Handle[R]]) -> list[R]:
    """Every handle's typed result, in order (the first failure raised), from one Watch."""
    if not handles:
        return []
    client = handles[0].client
    since = max(0, min(h.created_seq for h in handles) - 1)
    return client._run(_outcomes(client._async, handles, since))


class AsyncFunction(Function[P, R]):
    """A Function made of an `async def`: its result type is what the coroutine returns."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:  # type: ignore[override]
        result: Coroutine[Any, Any, R] = self.fn(*args, **kwargs)  # type: ignore[assignment]
        return result


def _made(fn: Callable[..., Any], name: str | None, defaults: dict[str, Any]) -> Any:
    cls = AsyncFunction if inspect.iscoroutinefunction(fn) else Function
    return cls(fn, name=name, **defaults)


class _Decorator:
    """`@task(...)` with options."""

    def __init__(self, name: str | None, defaults: dict[str, Any]) -> None:
        self._name, self._defaults = name, defaults

    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]]) -> AsyncFunction[P, R]: ...
    @overload
    def __call__(self, fn: Callable[P, R]) -> Function[P, R]: ...
    def __call__(self, fn: Callable[..., Any]) -> Any:
        return _made(fn, self._name, self._defaults)


@overload
def task(fn: Callable[P, Coroutine[Any, Any, R]], /) -> AsyncFunction[P, R]: ...
@overload
def task(fn: Callable[P, R], /) -> Function[P, R]: ...
@overload
def task(*, name: str | None = None, **defaults: Any) -> _Decorator: ...


def task(
    fn: Callable[..., Any] | None = None, /, *, name: str | None = None, **defaults: Any
) -> Any:
    """Make a function of an importable module runnable on nodes (`@shoal.task` or
    `@shoal.task(priority="high", timeout=timedelta(minutes=5), retries=2)`)."""
    if fn is not None:
        return _made(fn, name, defaults)
    return _Decorator(name, defaults)


def functions_of(module: object) -> Mapping[str, Function[Any, Any]]:
    """The functions `@task` made in a module, by name (import path)."""
    found = (getattr(module, attr, None) for attr in dir(module))
    return {f.name: f for f in found if isinstance(f, Function)}
