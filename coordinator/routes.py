"""LLM routing: an `llm` task's preference list, resolved to one provider and model."""

from __future__ import annotations

from collections.abc import Callable

from shoal.v1 import task_pb2

__all__ = ["route"]


def route(
    spec: task_pb2.TaskSpec, viable: Callable[[task_pb2.TaskSpec], bool]
) -> task_pb2.TaskSpec:
    """`spec` (an llm spec with routes) as its first route `viable` accepts would run it, or as
    its first route when none is: llm.provider and llm.model, the task's model and backend set.

    The routes stay in it, so the choice can be made again (a retry, after a breaker opened).
    """
    candidates = [_routed(spec, r) for r in spec.llm.routes]
    return next((c for c in candidates if viable(c)), candidates[0])


def _routed(spec: task_pb2.TaskSpec, r: task_pb2.LlmRoute) -> task_pb2.TaskSpec:
    out = task_pb2.TaskSpec()
    out.CopyFrom(spec)
    out.llm.provider, out.llm.model = r.provider, r.model
    out.model, out.backend = r.model, r.provider
    return out
