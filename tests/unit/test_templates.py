"""Upstream outputs filled into a dependent spec, and references checked at submit."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import struct_pb2

from shoal import python, shell
from shoal.coordinator.templates import references, render
from shoal.coordinator.validation import Limits, validate_batch
from shoal.errors import InvalidArgument
from shoal.v1 import task_pb2


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

    out = render(spec, upstream)

    assert list(out.shell.argv) == ["echo", "hello", "3"]
    assert dict(out.shell.env) == {"MODEL": "llama", "N": "3"}
    assert list(spec.shell.argv)[1] == "${{ deps[0].stdout }}"  # the original is untouched


def test_whole_output_is_json_and_a_missing_path_is_null() -> None:
    spec = python("print(${{ deps[0].output }}, ${{ deps[0].output.nope }})")
    assert render(spec, [result(a=[1, 2])]).python.code == 'print({"a": [1, 2]}, null)'


def test_references_are_checked_at_submit() -> None:
    good = shell("echo ${{ deps[0].stdout }}")
    good.depends_on.add(batch_index=1)
    upstream = shell("echo hi")
    validate_batch([good, upstream], Limits(), single=False)

    for text in ("${{ deps[1].stdout }}", "${{ deps[0].nonsense }}", "${{ secrets }}"):
        bad = shell(f"echo {text}")
        bad.depends_on.add(batch_index=1)
        assert [i for _, i in references(bad)] in ([1], [None])
        with pytest.raises(InvalidArgument, match="names no upstream"):
            validate_batch([bad, upstream], Limits(), single=False)


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
