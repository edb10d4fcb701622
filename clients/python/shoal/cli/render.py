"""How the CLI shows tasks, events, nodes and breakers: states, tables' cells, JSON."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from rich.markup import escape

from shoal._console import console
from shoal.specs import is_final, state_name
from shoal.v1 import admin_pb2, task_pb2


def print_json(messages: Iterable[Message]) -> None:
    """The messages as a JSON list (proto JSON, as `get --json` and grpcurl print them)."""
    console.print_json(data=[json_format.MessageToDict(m) for m in messages])


def state_text(state: int) -> str:
    name = state_name(state)
    colour = {"SUCCEEDED": "green", "FAILED": "red", "TIMED_OUT": "red", "CANCELLED": "yellow"}
    return f"[{colour[name]}]{name}[/]" if name in colour else name


def exit_text(task: task_pb2.Task) -> str:
    """The exit code of a task that ended after it started; "" for one that never ran."""
    if is_final(task.state) and task.HasField("started_at"):
        return str(task.result.exit_code)
    return ""


def event_line(e: task_pb2.Event) -> str:
    """One line for an event: a task's change or output, or a node, breaker or quota notice."""
    if e.HasField("node"):
        n = e.node
        if not n.throttled:
            return f"node {escape(n.node_id)} calm: takes every priority"
        floor = task_pb2.Priority.Name(n.min_priority).removeprefix("PRIORITY_")
        paused = f", {n.paused} paused" if n.paused else ""
        why = f" ({escape(n.reason)})" if n.reason else ""
        return (
            f"node {escape(n.node_id)} [yellow]throttled[/]{why}: takes {floor} or higher{paused}"
        )
    if e.HasField("breaker"):
        return f"breaker {escape(breaker_text(e.breaker))}"
    if e.HasField("quota"):
        q = e.quota
        if q.limited:
            return f"quota {escape(q.key)} holds tasks back: {escape(q.reason)}"
        return f"quota {escape(q.key)} lets tasks pass again"
    what = escape(repr(e.output.data)) if e.HasField("output") else state_text(e.state)
    node_part = f" node={e.node_id}" if e.node_id else ""
    return f"{e.task_id} {what}{node_part}"


def node_state(n: admin_pb2.NodeStatus) -> str:
    """`draining`, `throttled` (its machine is busy), `throttled, 2 paused`, or `ready`; for a
    node discovered on the LAN but not joined, `not joined` and its health."""
    if not n.connected:
        health = admin_pb2.NodeHealth.Name(n.health).removeprefix("NODE_HEALTH_")
        return f"[dim]not joined[/dim] ({health})"
    if n.draining:
        return "[yellow]draining[/yellow]"
    if n.throttled_by_load or n.paused:
        paused = f", {n.paused} paused" if n.paused else ""
        return f"[yellow]throttled{paused}[/yellow]"
    return "ready"


def breaker_text(b: task_pb2.Breaker) -> str:
    """`node:n1/shell open (5 failures, probe at 12:00:30)`."""
    state = task_pb2.BreakerState.Name(b.state).removeprefix("BREAKER_STATE_").lower()
    detail = f"{b.failures} failures"
    if b.state == task_pb2.BREAKER_STATE_OPEN:
        detail += f", probe at {utc_time(b.retry_at)}"
    return f"{b.key} {state} ({detail})"


def utc_time(ts: Any) -> str:
    return ts.ToDatetime().strftime("%Y-%m-%d %H:%M:%S UTC") if ts.ByteSize() else ""
