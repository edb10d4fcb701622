"""Tunables of the coordinator's engine."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from shoal.coordinator.gates.quotas import Pricing
from shoal.coordinator.placement import Routing
from shoal.coordinator.validation import Limits
from shoal.v1 import admin_pb2

__all__ = ["CoreOptions"]


@dataclass(frozen=True)
class CoreOptions:
    """Tunables of the core; durations are timedelta."""

    limits: Limits = field(default_factory=Limits)
    heartbeat_interval: timedelta = timedelta(seconds=3)
    lease: timedelta = timedelta(seconds=10)
    # Beyond this many heartbeats a second from all nodes together, new sessions heartbeat
    # less often, under leases longer in proportion (see NodeSessions.pace).
    max_heartbeat_rate: float = 500.0
    event_capacity: int = 100_000
    event_bytes: int = 64 << 20  # of output events held in memory (the oldest go first)
    finished_cache: int = 10_000
    node_message_rate: float = 2000.0
    node_message_burst: int = 4000
    routing: Routing = Routing.LEAST_LOADED  # for tasks that name no strategy
    tenant_weights: Mapping[str, float] = field(default_factory=dict)
    restart_grace: timedelta | None = None  # None: a lease
    # How long a task no connected node could ever run waits for one before it fails (unless
    # its spec says wait_for_node).
    unplaceable_grace: timedelta = timedelta(seconds=5)
    pricing: Pricing = field(default_factory=dict)  # model -> $ per 1M prompt/completion tokens
    quotas: Sequence[admin_pb2.Quota] = ()  # from configuration, on top of the stored ones
    breaker_threshold: int = 5
    breaker_cooldown: timedelta = timedelta(seconds=30)
    max_lock_ttl: timedelta = timedelta(hours=1)  # a lease's longest ttl at once
    max_catch_up: int = 10  # missed firings a CATCH_UP_ALL schedule runs at once
