"""What a node says of the tasks it runs (TaskUpdate): started, progress, output, finished or
given back, applied to their records; updates of attempts no longer its own are fenced off."""

from __future__ import annotations

from collections.abc import Sequence

from shoal._output import output_size
from shoal.coordinator.encoding import task_change
from shoal.coordinator.engine.dispatch import Dispatcher
from shoal.coordinator.engine.lifecycle import TaskLifecycle
from shoal.coordinator.engine.states import CANCELLED, FAILED, RUNNING, SUCCEEDED
from shoal.coordinator.progress import accepted_progress
from shoal.coordinator.sessions import NodeSession
from shoal.specs import FINAL_STATES, bounded_result, is_final
from shoal.v1 import node_pb2, task_pb2

__all__ = ["apply_updates"]


def apply_updates(
    k: TaskLifecycle, d: Dispatcher, session: NodeSession, updates: Sequence[node_pb2.TaskUpdate]
) -> None:
    """Apply a node's updates of its tasks (`k`: the engine's lifecycle, `d`: its dispatcher)."""
    freed = False
    caught_up = False  # it had not read what it was sent, and now has
    for u in updates:
        caught_up = session.read(u.task_id) or caught_up
        rec = session.inflight.get(u.task_id)
        kind = u.WhichOneof("update")
        if (
            rec is None
            or u.attempt.epoch != rec.attempt_epoch
            or u.attempt.number != rec.attempt
            or is_final(rec.state)
        ):
            # A stale attempt: fenced off; it changes nothing, and the node should stop it.
            session.stale_updates += 1
            if kind not in ("finished", "released"):
                session.cancel(u.task_id, u.attempt)
            continue
        if kind == "started":
            rec.state = RUNNING
            rec.started_at = k.wall()
            rec.progress = None
            k.events.emit(task_change(rec, by=session.principal.name))
        elif kind == "progress":
            progress = accepted_progress(
                u.progress, rec.progress, now=k.wall(), started_at=rec.started_at
            )
            if progress is not None:
                rec.progress = progress
                change = task_change(rec, by=session.principal.name)
                change.event().progress.CopyFrom(progress)
                k.events.emit(change)
        elif kind == "output":
            output = u.output
            size = output_size(output)
            if size > k.options.max_result_bytes:
                output.data = output.data[: k.options.max_result_bytes]
                output.raw = output.raw[: k.options.max_result_bytes]
                size = output_size(output)
            change = task_change(rec, by=session.principal.name, output=output)
            k.events.emit(change, size=size)
        elif kind in ("finished", "released"):
            del session.inflight[rec.id]
            k.scheduler.release(session.slots, rec)
            freed = True
            if kind == "released":
                # Given back unfinished by a draining node: no verdict, and not an attempt
                # its retry policy counts (its number is not used again, for fencing).
                d.end_attempt(rec, session.node_id, None)
                if rec.cancel_requested:
                    k.finish(rec, CANCELLED, task_pb2.TaskResult(error="cancelled"))
                else:
                    k.requeue(rec)
                continue
            state = u.finished.state
            had_output = u.finished.result.HasField("output")
            result = bounded_result(u.finished.result, k.options.max_result_bytes)
            if state not in FINAL_STATES:
                result.error = result.error or f"node reported non-final state {state}"
                state = FAILED
            elif (
                state == SUCCEEDED
                and had_output
                and not result.HasField("output")
                and rec.spec.HasField("function")
            ):
                # Its value is what a function call is for: without it, it did not succeed.
                result.error = "its return value is over the coordinator's max_result_bytes"
                state = FAILED
            d.end_attempt(rec, session.node_id, result)
            if rec.cancel_requested:
                k.finish(rec, state, result)
            else:
                k.after_failure(rec, state, result, by=session.principal.name)
    if freed:
        d.moved.add(session.node_id)
        k.kick()
    if caught_up:
        d.apply_node_state(session.node_id)  # it takes work again
