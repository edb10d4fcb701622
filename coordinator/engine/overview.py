"""The mesh at a glance (Admin.GetOverview), read from the engine's counters: no store query,
and nothing that grows with the number of tasks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from shoal.auth import Principal
from shoal.coordinator.engine.lifecycle import TaskLifecycle
from shoal.specs import state_name, timestamp
from shoal.v1 import admin_pb2

__all__ = ["overview"]


def overview(
    kernel: TaskLifecycle,
    nodes: Sequence[admin_pb2.NodeStatus],
    held: Mapping[str, int],
    *,
    by: Principal,
) -> admin_pb2.Overview:
    """Counters now; a principal bound to a tenant sees only that tenant's queue and backlog."""
    tenant = by.tenant
    out = admin_pb2.Overview(
        nodes=sum(1 for n in nodes if n.connected),
        nodes_draining=sum(1 for n in nodes if n.connected and n.draining),
        free_slots=sum(n.free_slots for n in nodes if n.connected),
        last_seq=kernel.events.last_seq,
        time=timestamp(kernel.wall()),
    )
    for (priority, owner), n in sorted(kernel.scheduler.queue.depths().items()):
        if not tenant or owner == tenant:
            out.queued.add(priority=priority, tenant=owner, tasks=n)
    for owner, n in kernel.unfinished.items():
        if n > 0 and (not tenant or owner == tenant):
            out.unfinished[owner] = n
    if tenant:
        return out
    for state, n in kernel.finished_count.items():
        out.finished[state_name(state)] = n
    out.running = sum(n.running for n in nodes)
    out.breakers_open = kernel.breakers.tripped
    out.held.update({key: n for key, n in held.items() if n > 0})
    return out
