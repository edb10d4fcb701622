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
        "ResourceExhausted",
        "ShoalError",
        "Task",
        "TaskResult",
        "TaskSpec",
        "Unavailable",
        "__version__",
        "noop",
        "python",
        "shell",
    ]
    for name in shoal.__all__:
        assert hasattr(shoal, name)
