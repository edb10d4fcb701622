"""The public surface of `shoal` is deliberate."""

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
