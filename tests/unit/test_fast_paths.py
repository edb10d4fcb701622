"""The fast paths skip work for specs that set none of the fields a list names: every field the
skipped code reads must be in that list, or a spec setting only it would go unchecked or
unplaced. Read from the sources (ast), so a field added to the code and not to its list fails."""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable
from typing import Any

from shoal import _builders as builders
from shoal import spec_checks
from shoal.coordinator.placement import requirements
from shoal.v1 import task_pb2

SPEC_FIELDS = frozenset(task_pb2.TaskSpec.DESCRIPTOR.fields_by_name)
# What the plain placement path reads itself: a spec's kind, its model, tool or function, provider.
PLAIN = frozenset({"custom", "function", "llm", "model", "tool"})


def _spec_fields_read(function: Callable[..., Any], *, after_return: bool = False) -> set[str]:
    """The `spec.<field>` names `function` reads; with `after_return`, only after its first
    early `return` (the guard)."""
    tree = ast.parse(inspect.getsource(function).lstrip())
    body = tree.body[0]
    assert isinstance(body, ast.FunctionDef)
    statements = body.body
    if after_return:
        guard = next(
            i
            for i, s in enumerate(statements)
            if isinstance(s, ast.If)
            and any(isinstance(b, ast.Return) for b in s.body)
            and "isdisjoint" in ast.unparse(s.test)
        )
        statements = statements[guard + 1 :]
    return {
        node.attr
        for statement in statements
        for node in ast.walk(statement)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "spec"
        and node.attr in SPEC_FIELDS
    }


def test_the_guard_lists_name_spec_fields() -> None:
    assert spec_checks._SCHEDULING <= SPEC_FIELDS
    assert requirements._PLACING <= SPEC_FIELDS


def test_every_field_the_scheduling_check_reads_is_in_its_guard() -> None:
    read = _spec_fields_read(spec_checks._check_scheduling, after_return=True)
    assert {"selectors", "depends_on", "retry"} <= read  # the reader works
    assert read <= spec_checks._SCHEDULING


def test_every_field_placement_reads_beyond_the_plain_path_is_in_its_guard() -> None:
    read = _spec_fields_read(requirements._placed)
    assert {"selectors", "resources", "affinity_key"} <= read  # the reader works
    assert read - PLAIN <= requirements._PLACING


def test_plain_specs_share_their_requirements() -> None:
    def shell(command: str) -> task_pb2.TaskSpec:
        return builders.shell(command)

    assert requirements.requirements_of(shell("true")) is requirements.requirements_of(
        shell("false")
    )
