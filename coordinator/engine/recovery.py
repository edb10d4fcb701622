"""Recovery at start: every unfinished task of the store queued again, or held for the node
that may still run it."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

from shoal.config import CoreOptions
from shoal.coordinator.encoding import task_record
from shoal.coordinator.engine.lifecycle import TaskLifecycle
from shoal.coordinator.engine.nodes import NodeSessions
from shoal.coordinator.engine.states import PENDING
from shoal.coordinator.placement import plain_requirements
from shoal.coordinator.records import TaskRecord
from shoal.coordinator.timers import TimerKind
from shoal.v1 import task_pb2

__all__ = ["recover"]

_FREEZE_AFTER = 100_000  # tasks recovered


async def recover(k: TaskLifecycle, n: NodeSessions, options: CoreOptions) -> None:
    """Queue every unfinished task of the store again (or hold it for its node: attach)."""
    with _collector_paused():  # a million new objects would set off full collections
        await _recover(k, n, options)
        if len(k.tasks) >= _FREEZE_AFTER:
            # The collector would walk every record once it runs again, and at each full
            # collection after: what lives now is kept out of its collections for good.
            gc.freeze()


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection inside (the collector runs again after, as it was)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


async def _recover(k: TaskLifecycle, n: NodeSessions, options: CoreOptions) -> None:
    records = []
    tasks, unfinished = k.tasks, k.unfinished
    names: dict[str, str] = {}  # one string per submitter or tenant, not one per task
    async for rows in k.store.unfinished():
        for seq, task_id, spec_bytes, created_at, by, depends_on, key, prio, tenant in rows:
            by = names.setdefault(by, by)
            if key is not None:  # nothing unusual: no need to parse its spec
                req = plain_requirements(key)
                tenant = names.setdefault(tenant, tenant)
                rec = TaskRecord(task_id, seq, spec_bytes, prio, req, tenant, created_at, by)
            else:
                spec = task_pb2.TaskSpec.FromString(spec_bytes)
                rec = task_record(task_id, seq, spec, spec_bytes, created_at, by)
                if depends_on:
                    rec.upstream = depends_on
            tasks[rec.id] = rec
            unfinished[rec.tenant] += 1
            records.append(rec)
    # Only records with a rare field set (`more`) can have upstream tasks to link.
    linked = [rec for rec in records if rec.more is not None]
    outcomes = await k.outcomes_of(linked)
    for rec in linked:
        k.link(rec, outcomes)
    n.expect_back(await k.store.members(), await k.store.node_attempts())
    grace = (options.restart_grace or options.lease).total_seconds()
    now = k.wall()
    if n.awaited:  # no task fails for want of a node before those nodes had their time
        k.unplaceable.hold_until = now + grace
    for rec in records:
        if rec.more is not None and rec.queue_timeout is not None:
            deadline = rec.created_at + rec.queue_timeout  # stored as wall time
            rec.queue_deadline = k.time.remaining(deadline, most=rec.queue_timeout)
        if n.awaited and grace > 0 and not rec.waiting_on and (rec.release_at or 0) <= now:
            rec.state = PENDING  # its node may still run it: see NodeSessions.attach
            k.recovering.add(rec.id)
        else:
            k.admit(rec)
    if k.recovering:
        k.set_timer(TimerKind.RECOVERY, "", k.time.now() + grace)
