"""Shoal: a gRPC service mesh of standalone worker nodes.

from shoal import Client, shell
with Client() as client:
    task = client.submit(shell("echo hello"))
    print(client.wait(task.id).result.stdout)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shoal._blocking import Client
    from shoal._builders import custom, docker, http, llm, noop, ollama, python, retry, shell, tool
    from shoal._client import AsyncClient
    from shoal._function import AsyncHandle, Function, Handle, async_gather, gather, task
    from shoal._output import chunk_bytes, stderr_bytes, stdout_bytes
    from shoal._progress import progress
    from shoal._state import TaskState
    from shoal.errors import (
        FailedPrecondition,
        InvalidArgument,
        NotFound,
        PermissionDenied,
        RemoteError,
        ResourceExhausted,
        ShoalError,
        TaskFailed,
        Unauthenticated,
        Unavailable,
        WaitTimeout,
    )
    from shoal.v1.task_pb2 import Event, Task, TaskResult, TaskSpec

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AsyncHandle",
    "Client",
    "Event",
    "FailedPrecondition",
    "Function",
    "Handle",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "RemoteError",
    "ResourceExhausted",
    "ShoalError",
    "Task",
    "TaskFailed",
    "TaskResult",
    "TaskSpec",
    "TaskState",
    "Unauthenticated",
    "Unavailable",
    "WaitTimeout",
    "__version__",
    "async_gather",
    "chunk_bytes",
    "custom",
    "docker",
    "gather",
    "http",
    "llm",
    "noop",
    "ollama",
    "progress",
    "python",
    "retry",
    "shell",
    "stderr_bytes",
    "stdout_bytes",
    "task",
    "tool",
]

# Each name is imported from its module when first used: a module that only declares
# functions (`@shoal.task`), as the node's function workers import, then does not load the
# client's gRPC and settings (half of each worker's memory, and of its start).
_HOME = {
    name: module
    for module, names in {
        "shoal._blocking": ["Client"],
        "shoal._builders": [
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
        ],
        "shoal._client": ["AsyncClient"],
        "shoal._function": ["AsyncHandle", "Function", "Handle", "async_gather", "gather", "task"],
        "shoal._output": ["chunk_bytes", "stderr_bytes", "stdout_bytes"],
        "shoal._progress": ["progress"],
        "shoal._state": ["TaskState"],
        "shoal.errors": [
            "FailedPrecondition",
            "InvalidArgument",
            "NotFound",
            "PermissionDenied",
            "RemoteError",
            "ResourceExhausted",
            "ShoalError",
            "TaskFailed",
            "Unauthenticated",
            "Unavailable",
            "WaitTimeout",
        ],
        "shoal.v1.task_pb2": ["Event", "Task", "TaskResult", "TaskSpec"],
    }.items()
    for name in names
}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'shoal' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
