"""The executor contract: a small class per kind of work, registered by name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

from shoal.config import NodeSettings
from shoal.node.executors.groups import ProcessGroups
from shoal.node.secrets import Redactor
from shoal.v1 import node_pb2, task_pb2

__all__ = [
    "ExecutionContext",
    "Executor",
    "InfrastructureError",
    "Outcome",
    "RunFailed",
    "TaskError",
    "available_executors",
    "register",
    "unpaced",
]

Emit = Callable[[task_pb2.OutputChunk], None]


async def unpaced() -> None:
    """An ExecutionContext's `paced` when nothing paces its output."""
    return None


@dataclass(frozen=True)
class ExecutionContext:
    """What an executor gets besides the spec.

    An executor that puts `secret_env` into a process's environment must pass everything that
    process says through `redactor` (a `redactor.stream()` per output stream) before it is
    emitted or put into the result. An executor that starts processes runs each in its own
    process group and registers it in `groups` while it lives, so that the node can pause it.
    """

    task_id: str
    emit: Emit  # streams an output chunk to whoever follows the task
    output_tail_bytes: int
    # The task's resolved secrets (variable -> value), set over the spec's own env.
    secret_env: Mapping[str, str] = field(default_factory=dict)
    redactor: Redactor = field(default_factory=Redactor)  # hides the values of secret_env
    # The node's working directory for tasks (a task's own cwd is taken relative to it).
    workdir: Path | None = None
    # The process groups the task runs in: the node pauses (SIGSTOP) and resumes them.
    groups: ProcessGroups = field(default_factory=ProcessGroups)
    # Awaited after each chunk emitted: returns once the link has room for more output, so a
    # task that prints faster than its output can be carried is slowed, not buffered.
    paced: Callable[[], Awaitable[None]] = unpaced
    # Called with what the task says of its progress (a fraction 0..1, a message).
    progress: Callable[[float, str], None] = lambda fraction, message: None


@dataclass
class Outcome:
    state: int  # a final TaskState
    result: task_pb2.TaskResult
    # The executor has other runs about to end (within moments): this one's report may wait a
    # little for theirs, so that they reach the coordinator in one message.
    more_follow: bool = False


class RunFailed(Exception):
    """A run failed outside the task's own code; `infrastructure` says whose fault it was.

    Raise `TaskError` or `InfrastructureError` from `run` (the node reports it as the task's
    FAILED outcome), or return its `outcome()`.
    """

    def __init__(self, message: str, *, infrastructure: bool, exit_code: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.infrastructure = infrastructure
        self.exit_code = exit_code

    def outcome(self) -> Outcome:
        """The FAILED outcome that reports it."""
        return Outcome(
            task_pb2.TASK_STATE_FAILED,
            task_pb2.TaskResult(
                exit_code=self.exit_code,
                error=self.message,
                infrastructure_failure=self.infrastructure,
            ),
        )


class TaskError(RunFailed):
    """The task's own mistake: bad arguments, or a secret, host, image, tool or model it asks
    for and may not have. It fails the task and never counts against the node, its executor or
    a backend (no circuit breaker), nor is it retried as an infrastructure failure: otherwise
    any submitter could shut nodes out for everyone with tasks that cannot run anywhere."""

    def __init__(self, message: str, *, exit_code: int = 0) -> None:
        super().__init__(message, infrastructure=False, exit_code=exit_code)


class InfrastructureError(RunFailed):
    """The node, its executor or an outside service failed, not the task: it counts toward
    their circuit breakers, and the task's retry policy retries it (elsewhere, perhaps)."""

    def __init__(self, message: str, *, exit_code: int = 0) -> None:
        super().__init__(message, infrastructure=True, exit_code=exit_code)


class Executor(ABC):
    """Runs one kind of spec. Cancellation arrives as asyncio.CancelledError and must clean up.

    A failure outside the task's own code is a `TaskError` or an `InfrastructureError`; any
    other exception escaping `run` is the executor's bug and counts as an infrastructure
    failure.

    Built once per node with the node's settings; `options` is its own table of them,
    `[node.executor_options.<name>]` (for third-party executors).
    """

    name: ClassVar[str]
    # Whether `async_refresh` has something to look at: the node then calls it now and then.
    refreshes: ClassVar[bool] = False

    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self.options: dict[str, Any] = settings.executor_options.get(self.name, {})

    def available(self) -> bool:
        """Whether this machine can run it: a quick check when the node is built."""
        return True

    async def async_available(self) -> bool:
        """Whether it can run now, when that takes I/O (an engine that must answer): awaited
        when the node starts; an executor that says no is not offered."""
        return True

    async def aclose(self) -> None:
        """Release what it holds (clients, connections) when the node stops."""
        return None

    def offers(self, info: node_pb2.NodeInfo) -> None:
        """Add to the node's info what it offers beyond its name (models, tools, providers)."""
        return None

    def offers_now(self, heartbeat: node_pb2.Heartbeat) -> None:
        """Add to a heartbeat what it offers that changes while the node runs (loaded models)."""
        return None

    async def async_refresh(self) -> bool:
        """Look again at what it offers (at start; then now and then, with `refreshes`);
        whether what `offers_now` says changed."""
        return False

    @abstractmethod
    async def run(self, spec: task_pb2.TaskSpec, ctx: ExecutionContext) -> Outcome:
        """Run the task to completion and return its outcome."""


_REGISTRY: dict[str, type[Executor]] = {}


def register(cls: type[Executor]) -> type[Executor]:
    """Class decorator: make an executor known by its name."""
    _REGISTRY[cls.name] = cls
    return cls


def available_executors(settings: NodeSettings) -> dict[str, Executor]:
    """Every available executor the settings enable (`executors`; empty: all): the built-ins and
    those of the `shoal.executors` entry points."""
    from shoal.node.executors import (  # noqa: F401  (registers the built-ins)
        docker,
        function,
        http,
        llm,
        noop,
        ollama,
        python,
        shell,
        tool,
    )

    for ep in entry_points(group="shoal.executors"):
        cls = ep.load()
        if isinstance(cls, type) and issubclass(cls, Executor):
            register(cls)
    out: dict[str, Executor] = {}
    enabled = settings.executors
    for name, cls in sorted(_REGISTRY.items()):
        if enabled and name not in enabled:
            continue
        executor = cls(settings)
        if executor.available():
            out[name] = executor
    return out
