"""Placement: the ready queue, the ledger of node resources and the choice of node per task.

- `model`: what placement works with (`Requirements`, `PlacementClass`, `NodeSlots`, ...).
- `requirements`: requirements from a spec and slots from a node's Hello (protobuf stays there).
- `routing`: the routing strategies and the affinity map.
- `ready_queue`: the fair ready queue, with parking so the head is never blocked.
- `scheduler`: the `Scheduler`, which places queued tasks on nodes with room.
- `pending`: why a queued task waits, as a sentence.

Nothing here blocks, does I/O or imports grpc.
"""

from shoal.coordinator.placement.model import (
    PRIORITY_LEVELS,
    NodeSlots,
    Op,
    PlacementClass,
    Preference,
    Queued,
    Requirements,
    Resources,
    Routing,
    Selector,
)
from shoal.coordinator.placement.ready_queue import ReadyQueue
from shoal.coordinator.placement.requirements import (
    fields_of,
    node_slots_of,
    plain_key,
    plain_requirements,
    requirements_of,
)
from shoal.coordinator.placement.routing import (
    ROUTERS,
    AffinityMap,
    Router,
    RouteState,
    most_preferred,
)
from shoal.coordinator.placement.scheduler import Scheduler

__all__ = [
    "PRIORITY_LEVELS",
    "ROUTERS",
    "AffinityMap",
    "NodeSlots",
    "Op",
    "PlacementClass",
    "Preference",
    "Queued",
    "ReadyQueue",
    "Requirements",
    "Resources",
    "RouteState",
    "Router",
    "Routing",
    "Scheduler",
    "Selector",
    "fields_of",
    "most_preferred",
    "node_slots_of",
    "plain_key",
    "plain_requirements",
    "requirements_of",
]
