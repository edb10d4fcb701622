"""How the CLI shows tasks, events, nodes and breakers: states, tables' cells, JSON."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from rich.markup import escape
from rich.text import Text

from shoal._console import console, err_console
from shoal.specs import is_final, state_name
from shoal.v1 import admin_pb2, task_pb2


def print_json(messages: Iterable[Message]) -> None:
    """The messages as a JSON list (proto JSON, as `get --json` and grpcurl print them)."""
    console.print_json(data=[json_format.MessageToDict(m) for m in messages])


# Control characters (but newline and tab): in a terminal, escape sequences that set its
# title, write the clipboard or clear the screen. Shown as \x1b and the like.
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if chr(c) not in "\n\t"}
_OUTPUT = {c: shown for c, shown in _CONTROL.items() if c != 0x0D}  # a progress bar's \r too
_COLOUR = re.compile(r"(\x1b\[[0-9;:]*m)")  # SGR: colours and bold, which do nothing else


def visible(text: str, *, output: bool = False) -> str:
    """`text` with its control characters shown rather than acted on by a terminal. A task's
    `output` keeps its colours and carriage returns."""
    if not output:
        return text.translate(_CONTROL)
    parts = _COLOUR.split(text)  # colours at the odd places
    return "".join(p if i % 2 else p.translate(_OUTPUT) for i, p in enumerate(parts))


def shown(text: str) -> str:
    """Data (what tasks and nodes say) in a line of rich markup: neither styles nor escapes."""
    return escape(visible(text))


def plain(*values: str) -> list[Text]:
    """Table cells of data (names, errors, what tasks and nodes say) shown as they are, never
    read as rich markup: "[/x]" in a task's name neither styles nor breaks a table, and an
    escape sequence is shown, not sent to the terminal."""
    return [Text(visible(v)) for v in values]


def state_text(state: int) -> str:
    name = state_name(state)
    colour = {"SUCCEEDED": "green", "FAILED": "red", "TIMED_OUT": "red", "CANCELLED": "yellow"}
    return f"[{colour[name]}]{name}[/]" if name in colour else name


def exit_text(task: task_pb2.Task) -> str:
    """The exit code of a task that ended after it started; "" for one that never ran."""
    if is_final(task.state) and task.HasField("started_at"):
        return str(task.result.exit_code)
    return ""


def returned_text(task: task_pb2.Task) -> str:
    """What a task returned, as JSON: a function's value, another task's output object; ""
    for none."""
    if task.spec.HasField("function"):
        value = task.result.output.fields.get("value")
        return value.string_value if value is not None else ""
    if task.result.HasField("output"):
        return json.dumps(json_format.MessageToDict(task.result.output), ensure_ascii=False)
    return ""


def event_line(e: task_pb2.Event) -> str:
    """One line for an event: a task's change or output, or a node, breaker or quota notice."""
    if e.HasField("node"):
        n = e.node
        if not n.throttled:
            return f"node {shown(n.node_id)} calm: takes every priority"
        floor = task_pb2.Priority.Name(n.min_priority).removeprefix("PRIORITY_")
        paused = f", {n.paused} paused" if n.paused else ""
        why = f" ({shown(n.reason)})" if n.reason else ""
        return f"node {shown(n.node_id)} [yellow]throttled[/]{why}: takes {floor} or higher{paused}"
    if e.HasField("breaker"):
        return f"breaker {shown(breaker_text(e.breaker))}"
    if e.HasField("quota"):
        q = e.quota
        if q.limited:
            return f"quota {shown(q.key)} holds tasks back: {shown(q.reason)}"
        return f"quota {shown(q.key)} lets tasks pass again"
    if e.HasField("progress"):
        return f"{e.task_id} progress {shown(progress_text(e.progress))}"
    what = shown(repr(e.output.data)) if e.HasField("output") else state_text(e.state)
    node_part = f" node={shown(e.node_id)}" if e.node_id else ""
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


def progress_text(p: task_pb2.Progress, *, now: float | None = None) -> str:
    """`45% 45 of 100 files (ends in about 12 s)`."""
    text = f"{p.fraction:.0%}" + (f" {p.message}" if p.message else "")
    if p.HasField("estimated_end") and p.fraction < 1:
        left = p.estimated_end.ToNanoseconds() / 1e9 - (time.time() if now is None else now)
        if left >= 1:  # an end already past says nothing
            text += f" (ends in about {_span(left)})"
    return text


def _span(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class ProgressBar:
    """A task's progress as a bar on stderr (a line per report when stderr is no terminal),
    shown from its first report; `close` removes it."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._row: Any = None

    def show(self, p: task_pb2.Progress) -> None:
        if not err_console.is_terminal:
            err_console.print(f"progress: {shown(progress_text(p))}", highlight=False)
            return
        if self._bar is None:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TimeRemainingColumn(),
                console=err_console,
                transient=True,
            )
            self._bar.start()
            self._row = self._bar.add_task("", total=1.0)
        self._bar.update(self._row, completed=p.fraction, description=shown(p.message[:60]))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
