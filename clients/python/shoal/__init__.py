"""Shoal: a gRPC service mesh of standalone worker nodes.

from shoal import Client, shell
with Client() as client:
    task = client.submit(shell("echo hello"))
    print(client.wait(task.id).result.stdout)
"""

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
