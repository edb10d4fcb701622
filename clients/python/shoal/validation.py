"""Checks on submitted batches: a bad spec is refused with every violation named, nothing
stored. The limits, sizes, dependencies within a batch and its cycles are checked here, each
spec's own fields in `shoal.spec_checks`.

Shared by the coordinator (Submit) and the node (direct Execute).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from shoal.errors import FieldViolation, InvalidArgument, ResourceExhausted
from shoal.spec_checks import spec_violations
from shoal.specs import fields_of
from shoal.v1 import task_pb2

__all__ = ["Limits", "check_request_id", "validate_batch"]


class Limits(BaseModel):
    """Bounds on what a client may submit (the coordinator's settings carry each one)."""

    model_config = ConfigDict(extra="forbid")

    max_spec_bytes: int = 1 << 20
    max_batch: int = 10_000
    max_string: int = 256  # names, keys, tenants, label keys and values
    max_labels: int = 64  # entries of each map or list in a spec (and env maps and secrets)
    max_result_bytes: int = 1 << 20  # a result a node reports; larger ones are cut
    # A spec with its upstream outputs (`${{ deps[0].stdout }}`) filled in: over it, the task
    # fails when it would be dispatched.
    max_rendered_spec_bytes: int = Field(default=4 << 20, gt=0)
    max_watch_tasks: int = 1000  # task ids in one Watch filter
    # Slots one node may claim (a Hello beyond it, or beyond sane resources, is refused).
    max_node_slots: int = Field(default=1024, ge=1)
    # Backpressure: submits beyond these many unfinished tasks get RESOURCE_EXHAUSTED with a
    # retry delay (per tenant: 0 means no cap).
    max_queued: int = 1_000_000
    max_queued_per_tenant: int = 0
    # Tasks one tenant may submit per second (a token bucket, bursts of tenant_submit_burst,
    # 0: a second's worth); beyond it, RESOURCE_EXHAUSTED with QuotaFailure and RetryInfo.
    # 0: no limit.
    tenant_submit_rate: float = 0.0
    tenant_submit_burst: int = 0
    max_depends_on: ClassVar[int] = 100  # upstream tasks of one task (fan-in)
    max_attempts: ClassVar[int] = 100


_CYCLE_SHOWN = 5
"""The tasks of a dependency cycle named in its error; the others are counted."""


def _cycle(specs: Sequence[task_pb2.TaskSpec]) -> list[int] | None:
    """Indexes of a dependency cycle within the batch, or None."""
    if not any(spec.depends_on for spec in specs):
        return None
    edges = [
        [d.batch_index for d in spec.depends_on if d.HasField("batch_index")] for spec in specs
    ]
    state = [0] * len(specs)  # 0 new, 1 on the path, 2 done
    for start in range(len(specs)):
        if state[start]:
            continue
        path, stack = [start], [iter(edges[start])]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif 0 <= nxt < len(specs):
                if state[nxt] == 1:
                    return path[path.index(nxt) :]
                if state[nxt] == 0:
                    state[nxt] = 1
                    path.append(nxt)
                    stack.append(iter(edges[nxt]))
    return None


def check_request_id(request_id: str, limits: Limits) -> None:
    if len(request_id) > limits.max_string or not request_id.isprintable():
        raise InvalidArgument(
            f"request_id must be printable text of at most {limits.max_string} characters",
            [FieldViolation("request_id", "not printable, or too long")],
        )


def validate_batch(
    specs: Sequence[task_pb2.TaskSpec],
    limits: Limits,
    *,
    single: bool,
    encoded: Sequence[bytes] | None = None,
    fields: Sequence[Mapping[str, Any]] | None = None,
) -> None:
    """Raise InvalidArgument or ResourceExhausted naming every bad field of the batch.
    `encoded` and `fields`: each spec serialized and its fields_of, when the caller has them."""
    if not specs:
        raise InvalidArgument("empty batch: submit at least one spec")
    if len(specs) > limits.max_batch:
        raise ResourceExhausted(
            f"batch of {len(specs)} tasks exceeds the limit of {limits.max_batch}",
            violations=[FieldViolation("specs", f"at most {limits.max_batch} per batch")],
        )
    oversize = [
        FieldViolation(
            "spec" if single else f"specs[{i}]", f"{size} bytes > {limits.max_spec_bytes}"
        )
        for i, spec in enumerate(specs)
        if (size := spec.ByteSize() if encoded is None else len(encoded[i])) > limits.max_spec_bytes
    ]
    if oversize:
        raise ResourceExhausted(
            f"task spec larger than {limits.max_spec_bytes} bytes", violations=oversize
        )
    violations: list[FieldViolation] = []
    keys: set[str] = set()
    for i, spec in enumerate(specs):
        at = "spec" if single else f"specs[{i}]"
        present = fields_of(spec) if fields is None else fields[i]
        data = spec.SerializeToString() if encoded is None else encoded[i]
        violations += spec_violations(spec, at, limits, present, data)
        for j, dep in enumerate(spec.depends_on if "depends_on" in present else ()):
            if dep.HasField("batch_index") and (
                dep.batch_index >= len(specs) or dep.batch_index == i
            ):
                violations.append(
                    FieldViolation(
                        f"{at}.depends_on[{j}].batch_index",
                        f"{dep.batch_index} is not another task of this batch",
                    )
                )
        if "idempotency_key" in present:
            if spec.idempotency_key in keys:
                violations.append(
                    FieldViolation(f"{at}.idempotency_key", "repeated within the batch")
                )
            keys.add(spec.idempotency_key)
    if not violations and (cycle := _cycle(specs)) is not None:
        # A cycle may run through the whole batch: its path is shown in part.
        loop = " -> ".join(f"specs[{i}]" for i in cycle[:_CYCLE_SHOWN])
        if len(cycle) > _CYCLE_SHOWN:
            loop += f" -> … and {len(cycle) - _CYCLE_SHOWN} more"
        loop += f" -> specs[{cycle[0]}]"
        violations.append(FieldViolation("depends_on", f"dependency cycle: {loop}"))
    if violations:
        first = violations[0]
        more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
        raise InvalidArgument(f"{first.field}: {first.description}{more}", violations)
