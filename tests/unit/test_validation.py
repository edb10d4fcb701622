"""Bad specs are refused with every violation named."""

from __future__ import annotations

import pytest

from shoal import docker, noop, python, shell
from shoal.errors import InvalidArgument, ResourceExhausted
from shoal.v1 import task_pb2
from shoal.validation import Limits, validate_batch

LIMITS = Limits()


def violations(specs: list[task_pb2.TaskSpec]) -> list[str]:
    with pytest.raises(InvalidArgument) as info:
        validate_batch(specs, LIMITS, single=False)
    return [v.field for v in info.value.violations]


def test_good_specs_pass() -> None:
    validate_batch(
        [shell("echo hi"), shell(["true"]), python("print(1)"), noop()], LIMITS, single=False
    )


def test_each_bad_field_is_named() -> None:
    negative = shell("true")
    negative.timeout.seconds = -1
    unknown_priority = shell("true")
    unknown_priority.priority = 42  # type: ignore[assignment]
    both = task_pb2.TaskSpec(shell=task_pb2.ShellSpec(argv=["a"], script="b"))
    assert violations(
        [
            task_pb2.TaskSpec(),
            task_pb2.TaskSpec(shell=task_pb2.ShellSpec()),
            negative,
            unknown_priority,
            both,
            python("   "),
            task_pb2.TaskSpec(custom=task_pb2.CustomSpec()),
        ]
    ) == [
        "specs[0].kind",
        "specs[1].shell",
        "specs[2].timeout",
        "specs[3].priority",
        "specs[4].shell",
        "specs[5].python.code",
        "specs[6].custom.executor",
    ]


def test_what_no_process_can_start_with_is_refused() -> None:
    """A NUL ends a C string (the node could not start the command: before, its error counted
    against the node), and '=' ends a variable's name."""
    assert violations(
        [
            shell(["echo", "a\0b"]),
            shell("true", env={"A=B": "1"}),
            shell("true", env={"": "1"}),
            shell("true", env={"A": "b\0"}),
            shell("true", cwd="x\0"),
            python("print(1)", args=["\0"]),
            docker("image", ["a\0"]),
        ]
    ) == [
        "specs[0].shell.argv",
        "specs[1].shell.env",
        "specs[2].shell.env",
        "specs[3].shell.env['A']",
        "specs[4].shell.cwd",
        "specs[5].python.args",
        "specs[6].docker.command",
    ]
    validate_batch(
        [shell(["true"], env={"OK_1": "x", "lower.case-name": "y"})], LIMITS, single=True
    )


def test_repeated_key_in_one_batch() -> None:
    assert violations([shell("a", idempotency_key="k"), shell("b", idempotency_key="k")]) == [
        "specs[1].idempotency_key"
    ]


def test_sizes_are_resource_exhausted() -> None:
    with pytest.raises(ResourceExhausted):
        validate_batch([shell("x" * (LIMITS.max_spec_bytes + 1))], LIMITS, single=True)
    with pytest.raises(ResourceExhausted):
        validate_batch([shell("true")] * (LIMITS.max_batch + 1), LIMITS, single=False)
    with pytest.raises(InvalidArgument):
        validate_batch([], LIMITS, single=False)


def test_strings_maps_and_secret_refs_are_bounded() -> None:
    long = "x" * (LIMITS.max_string + 1)
    many = {f"k{i}": "v" for i in range(LIMITS.max_labels + 1)}
    secrets = shell("true")
    secrets.secrets.add(name="db-password", env="1BAD")
    secrets.secrets.add(name="", env="OK")
    forever = shell("true")
    forever.timeout.seconds = 2**62  # beyond what Duration (and timedelta) can hold
    twice = shell("true", env={"SAME": "1"})
    twice.secrets.add(name="../etc/passwd", env="X")
    twice.secrets.add(name="b", env="SAME")
    assert violations(
        [
            shell("true", name=long),
            shell("true", tenant=long),
            shell("true", labels={"zone": long}),
            shell("true", env=many),
            shell("true", metadata={long: "v"}),
            secrets,
            twice,
            forever,
        ]
    ) == [
        "specs[0].name",
        "specs[1].tenant",
        "specs[2].required_labels",
        "specs[3].shell.env",
        "specs[4].metadata",
        "specs[5].secrets[0].env",
        "specs[5].secrets[1].name",
        "specs[6].secrets[0].name",
        "specs[6].secrets[1].env",
        "specs[7].timeout",
    ]


def _http_with_header(value: str, *secrets: str) -> task_pb2.TaskSpec:
    spec = task_pb2.TaskSpec(
        http=task_pb2.HttpSpec(url="https://api.example.com/", headers={"Authorization": value})
    )
    for name in secrets:
        spec.secrets.add(name=name, env="TOKEN")
    return spec


def test_an_http_header_may_name_a_secret_the_task_lists() -> None:
    validate_batch(
        [_http_with_header("Bearer ${{ secrets.api-token }}", "api-token")], LIMITS, single=False
    )
    assert violations([_http_with_header("Bearer ${{ secrets.other }}", "api-token")]) == [
        "specs[0].http.headers"
    ]
    # Elsewhere it is no reference: a task gets its secrets in its environment.
    elsewhere = shell("echo ${{ secrets.api-token }}")
    elsewhere.secrets.add(name="api-token", env="TOKEN")
    assert violations([elsewhere]) == ["specs[0].shell.script"]


def test_a_task_may_not_name_the_keys_the_coordinator_adds() -> None:
    """Another tenant's key would spend that tenant's quota."""
    assert violations(
        [
            shell("true", quota_keys=["tenant:globex"]),
            shell("true", quota_keys=["gpu", "executor:docker"]),
            shell("true", quota_keys=["model:big", "backend:x"]),
        ]
    ) == [
        "specs[0].quota_keys[0]",
        "specs[1].quota_keys[1]",
        "specs[2].quota_keys[0]",
        "specs[2].quota_keys[1]",
    ]
    validate_batch([shell("true", quota_keys=["provider:openai", "gpu"])], LIMITS, single=True)


def test_tenants_and_required_labels_are_names() -> None:
    """A tenant's locks are named `tenant/<tenant>/`: "a" and "a/b" would share them."""
    assert violations(
        [
            shell("true", tenant="a/b"),
            shell("true", labels={"zone": "b\nc"}),
            shell("true", labels={"": "x"}),
        ]
    ) == ["specs[0].tenant", "specs[1].required_labels", "specs[2].required_labels"]
    validate_batch([shell("true", tenant="acme", labels={"zone": "eu-1"})], LIMITS, single=True)
