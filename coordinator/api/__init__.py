"""gRPC servicers of the coordinator: decode, call the engine, encode.

The Gate (shoal._gate) has already authenticated the caller, checked its role and mapped
errors to statuses; `current_principal()` is who is calling.
"""

from shoal.coordinator.api.admin import AdminService
from shoal.coordinator.api.gateway import NodeGatewayService, run_session
from shoal.coordinator.api.locks import LocksService
from shoal.coordinator.api.tasks import TasksService

__all__ = ["AdminService", "LocksService", "NodeGatewayService", "TasksService", "run_session"]
