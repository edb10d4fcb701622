"""Upstream outputs filled into a dependent spec, and references checked at submit."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import struct_pb2

from shoal import docker, llm, ollama, python, shell, tool
from shoal.errors import FieldViolation, InvalidArgument
from shoal.templates import MAX_MESSAGES, references, render
from shoal.v1 import task_pb2
from shoal.validation import Limits, validate_batch

LIMIT = Limits().max_rendered_spec_bytes


def result(stdout: str = "", code: int = 0, **output: Any) -> task_pb2.TaskResult:
    r = task_pb2.TaskResult(stdout=stdout, exit_code=code)
    if output:
        s = struct_pb2.Struct()
        s.update(output)
        r.output.CopyFrom(s)
    return r


def test_every_string_of_the_kind_is_rendered() -> None:
    spec = shell(
        ["echo", "${{ deps[0].stdout }}", "${{deps[1].exit_code}}"],
        env={"MODEL": "${{ deps[1].output.model.name }}", "N": "${{ deps[1].output.n }}"},
    )
    upstream = [result("hello\n\n"), result(code=3, model={"name": "llama"}, n=3)]

    out = render(spec, upstream, limit=LIMIT)

    assert list(out.shell.argv) == ["echo", "hello", "3"]
    assert dict(out.shell.env) == {"MODEL": "llama", "N": "3"}
    assert list(spec.shell.argv)[1] == "${{ deps[0].stdout }}"  # the original is untouched
    # One that names no upstream (refused at submit, but stored before) is left as it is.
    assert list(render(spec, upstream[:1], limit=LIMIT).shell.argv)[2] == "${{deps[1].exit_code}}"


def test_whole_output_is_json_and_a_missing_path_is_null() -> None:
    spec = python("", env={"ALL": "${{ deps[0].output }}", "NOPE": "${{ deps[0].output.nope }}"})
    assert dict(render(spec, [result(a=[1, 2])], limit=LIMIT).python.env) == {
        "ALL": '{"a": [1, 2]}',
        "NOPE": "null",
    }


def test_references_are_checked_at_submit() -> None:
    good = shell(["echo", "${{ deps[0].stdout }}"])
    good.depends_on.add(batch_index=1)
    upstream = shell("echo hi")
    validate_batch([good, upstream], Limits(), single=False)

    allowed = (
        "a reference is ${{ deps[N].stdout }}, .stderr, .exit_code, .output or .output.key.path"
    )
    for text, why in (
        ("${{ deps[1].stdout }}", "names no upstream task of depends_on"),
        ("${{ deps[0].nonsense }}", f"is malformed: {allowed}"),  # a typo: say what is allowed
        ("${{ secrets }}", f"is malformed: {allowed}"),
    ):
        bad = shell(["echo", text])
        bad.depends_on.add(batch_index=1)
        assert [r.upstream for r in references(bad)] in ([1], [None])
        with pytest.raises(InvalidArgument) as refused_:
            validate_batch([bad, upstream], Limits(), single=False)
        [violation] = refused_.value.violations
        assert violation.description == f"{text!r} {why}"


def test_a_cycle_or_a_bad_index_in_a_batch_is_refused() -> None:
    a, b, c = shell("true"), shell("true"), shell("true")
    a.depends_on.add(batch_index=1)
    b.depends_on.add(batch_index=2)
    c.depends_on.add(batch_index=0)
    with pytest.raises(InvalidArgument, match=r"cycle: specs\[0\] -> specs\[1\] -> specs\[2\]"):
        validate_batch([a, b, c], Limits(), single=False)
    selfish = shell("true")
    selfish.depends_on.add(batch_index=0)
    with pytest.raises(InvalidArgument, match="not another task"):
        validate_batch([selfish], Limits(), single=False)


REF = "${{ deps[0].stdout }}"


def refused(spec: task_pb2.TaskSpec) -> list[FieldViolation]:
    """The violations of `spec` (given one upstream) at submit."""
    spec.depends_on.add(task_id="upstream")
    with pytest.raises(InvalidArgument) as info:
        validate_batch([spec], Limits(), single=True)
    return info.value.violations


def accepted(spec: task_pb2.TaskSpec, upstreams: int = 1) -> task_pb2.TaskSpec:
    """`spec` (given `upstreams`) passes the checks at submit."""
    for i in range(upstreams):
        spec.depends_on.add(task_id=f"upstream{i}")
    validate_batch([spec], Limits(), single=True)
    return spec


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (shell(f"echo {REF}"), "shell.script"),
        (task_pb2.TaskSpec(shell=task_pb2.ShellSpec(script="true", shell=REF)), "shell.shell"),
        (shell([REF, "x"]), "shell.argv[0]"),
        (shell(["sh", "-c", f"echo {REF}"]), "shell.argv[2]"),
        (shell(["/bin/bash", "-c", "echo $1", "_", REF]), "shell.argv[4]"),
        (shell(["/usr/bin/python3.12", "-c", REF]), "shell.argv[2]"),
        (shell(["bash-5.2", "-c", REF]), "shell.argv[2]"),
        (shell(["env", "A=1", "sh", "-c", REF]), "shell.argv[4]"),
        (shell(["xargs", "-I{}", REF]), "shell.argv[2]"),
        (python(f"print('{REF}')"), "python.code"),
        (docker(REF), "docker.image"),
        (docker("alpine", ["sh", "-c", f"echo {REF}"]), "docker.command[2]"),
        (docker("alpine", [REF]), "docker.command[0]"),
        (tool(REF), "tool.name"),
        (task_pb2.TaskSpec(custom=task_pb2.CustomSpec(executor=REF)), "custom.executor"),
    ],
)
def test_a_reference_in_code_is_refused_naming_its_field(
    spec: task_pb2.TaskSpec, field: str
) -> None:
    [violation] = refused(spec)

    assert violation.field == f"spec.{field}"
    assert "env value" in violation.description


def test_references_where_no_interpreter_parses_them_are_filled() -> None:
    params = struct_pb2.Struct()
    params.update({"query": REF, "nested": {"list": ["a", REF]}})
    specs = [
        shell(["echo", REF], env={"X": REF}, cwd=f"/tmp/{REF}"),
        shell('echo "$X"', env={"X": REF}),
        python("import os; print(os.environ['X'])", args=[REF], env={"X": REF}),
        docker("alpine", ["echo", REF], env={"X": REF}),
        task_pb2.TaskSpec(http=task_pb2.HttpSpec(url=f"https://h/{REF}", headers={"h": REF})),
        llm("openai", "gpt", prompt=REF, messages=[{"role": "user", "content": REF}]),
        ollama("llama", prompt=REF, system=REF),
        tool("search", {"query": REF}),
        task_pb2.TaskSpec(custom=task_pb2.CustomSpec(executor="mine", params=params)),
    ]
    for spec in specs:
        out = str(render(accepted(spec), [result("$(touch /tmp/pwned); x\n")], limit=LIMIT))
        assert "${{" not in out and "$(touch /tmp/pwned); x" in out, out


def test_a_docker_task_with_files_takes_references_and_keeps_its_files() -> None:
    spec = accepted(docker("alpine", ["cat", "/work/in"], env={"X": REF}, files={"/work/in": REF}))

    out = render(spec, [result("up")], limit=LIMIT)

    assert dict(out.docker.env) == {"X": "up"}
    assert dict(out.docker.files) == {"/work/in": REF.encode()}  # bytes are never templated


def test_a_reference_across_lines_is_checked_and_filled() -> None:
    multiline = "${{\n  deps[0].stdout\n}}"
    assert refused(shell(["echo", multiline.replace("0", "3")]))[0].field == "spec.shell.argv[1]"
    assert list(
        render(accepted(shell(["echo", multiline])), [result("up")], limit=LIMIT).shell.argv
    ) == [
        "echo",
        "up",
    ]


def test_more_references_than_the_limit_are_refused() -> None:
    limit = Limits().max_labels
    accepted(shell(["echo", REF * limit]))
    [violation] = refused(shell(["echo", REF * (limit + 1)]))
    assert violation.field == "spec.shell" and f"more than {limit}" in violation.description


MB = 1 << 20


@pytest.mark.timeout(30)
def test_hostile_template_strings_are_scanned_correctly() -> None:
    """About 1 MB each; before the scan was linear, each of these held a core for minutes."""
    size = 1_000_000  # under the spec size limit
    # `${{` with no `}}` after it is no reference: plain text, left as it is.
    for text in ("${{" * (size // 3), "${{ deps[" * (size // 9), "${{ deps[0].output." * 50_000):
        spec = accepted(shell(["echo", text]))
        assert list(references(spec)) == []
        assert render(spec, [result("up")], limit=LIMIT).shell.argv[1] == text
    # One long span, from the first `${{` to the `}}` at the end: one malformed reference.
    for text in ("${{" * (size // 3 - 1) + "}}", "${{ deps[0].output." + "a" * (size - 30) + "!}}"):
        [violation] = refused(shell(["echo", text]))
        assert violation.field == "spec.shell.argv[1]"
        assert "is malformed" in violation.description
        assert [r.upstream for r in references(shell(["echo", text]))] == [None]
    # Nested: the span ends at the first `}}`, and holds a `${{` it should not.
    nested = "${{ " * (size // 40) + REF + " }}" * (size // 40)
    assert "is malformed" in refused(shell(["echo", nested]))[0].description
    # A program named by a million digits is a plain program (no version to strip off).
    accepted(shell(["1" * size + "x", REF]))
    # An index of a million digits is malformed, not a number to convert.
    assert (
        "is malformed"
        in refused(shell(["echo", "${{ deps[" + "9" * size + "].stdout }}"]))[0].description
    )
    # Many references: a field is named once, and the scan stops beyond the most a spec holds.
    many = refused(python("#" + "${{}}" * (size // 10), env={"X": "${{}}" * (size // 10)}))
    assert [v.field for v in many] == ["spec.python.code", "spec.python"]


def test_a_spec_with_references_holds_a_bounded_number_of_messages_to_search() -> None:
    def custom(entries: int, value: str) -> task_pb2.TaskSpec:
        params = struct_pb2.Struct()
        params.update({f"k{i}": value for i in range(entries)})
        return task_pb2.TaskSpec(custom=task_pb2.CustomSpec(executor="mine", params=params))

    accepted(custom(MAX_MESSAGES - 10, REF[:-2]))  # a `${{` somewhere, searched in full
    accepted(custom(10 * MAX_MESSAGES, "v"))  # no `${{` at all: nothing to search
    [violation] = refused(custom(MAX_MESSAGES, REF[:-2]))
    assert violation.field == "spec.custom"
    assert f"more than {MAX_MESSAGES} messages" in violation.description


def test_an_upstream_value_cannot_name_a_secret_in_an_http_header() -> None:
    spec = task_pb2.TaskSpec(
        http=task_pb2.HttpSpec(
            url="https://api.example.com/",
            headers={"X-Data": "${{ deps[0].stdout }}", "Authorization": "${{ secrets.api }}"},
        ),
    )
    spec.depends_on.add(task_id="up")
    plain = render(spec, [task_pb2.TaskResult(stdout="42\n")], limit=LIMIT)
    assert plain.http.headers["X-Data"] == "42"  # a plain value is filled in
    assert plain.http.headers["Authorization"] == "${{ secrets.api }}"  # for the node
    hostile = task_pb2.TaskResult(stdout="${{ secrets.api }}")
    with pytest.raises(InvalidArgument, match=r"http.headers\['X-Data'\]"):
        render(spec, [hostile], limit=LIMIT)
