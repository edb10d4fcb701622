"""The public surface of `shoal` is deliberate."""

import shoal


def test_public_names() -> None:
    assert sorted(shoal.__all__) == [
        "AsyncClient",
        "Client",
        "Event",
        "FailedPrecondition",
        "InvalidArgument",
        "NotFound",
        "PermissionDenied",
        "ResourceExhausted",
        "ShoalError",
        "Task",
        "TaskFailed",
        "TaskResult",
        "TaskSpec",
        "Unauthenticated",
        "Unavailable",
        "__version__",
        "chunk_bytes",
        "docker",
        "llm",
        "noop",
        "ollama",
        "python",
        "retry",
        "shell",
        "stderr_bytes",
        "stdout_bytes",
        "tool",
    ]
    for name in shoal.__all__:
        assert hasattr(shoal, name)
