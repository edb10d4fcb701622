"""The public surface of `shoal` is deliberate."""

import subprocess
import sys

import pytest

import shoal
from shoal.v1 import task_pb2


def test_public_names() -> None:
    assert sorted(shoal.__all__) == [
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
    for name in shoal.__all__:
        assert hasattr(shoal, name)


def test_task_states_read_by_name_and_equal_the_wire() -> None:
    for value in task_pb2.TaskState.values():
        state = shoal.TaskState(value)
        assert state == int(value)
        assert (
            str(state) == f"{state}" == task_pb2.TaskState.Name(value).removeprefix("TASK_STATE_")
        )
    assert len(shoal.TaskState) == len(task_pb2.TaskState.values())
    assert shoal.TaskState.SUCCEEDED.final and not shoal.TaskState.RUNNING.final


def test_a_module_of_functions_does_not_load_the_client() -> None:
    """What a node's function workers import (`import shoal`, `@shoal.task`) leaves gRPC and
    the settings out; the client's names still come on first use."""
    script = (
        "import sys, shoal\n"
        "@shoal.task\n"
        "def f(x: int) -> int:\n"
        "    return x\n"
        "import shoal.node.functions.worker\n"
        "loaded = set(sys.modules)\n"
        "assert 'grpc' not in loaded and 'shoal.config' not in loaded, sorted(loaded)\n"
        "assert shoal.Client.__module__ == 'shoal._blocking' and 'grpc' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        shoal.nope  # noqa: B018
    assert set(shoal.__all__) <= set(dir(shoal))
