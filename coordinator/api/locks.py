"""The Locks service: leases on named locks, held from outside the mesh."""

from __future__ import annotations

from datetime import timedelta

from shoal._gate import current_principal
from shoal.coordinator.api.context import Ctx
from shoal.coordinator.engine import Coordinator
from shoal.errors import InvalidArgument
from shoal.specs import duration
from shoal.v1 import locks_pb2, locks_pb2_grpc

__all__ = ["LocksService"]


def _ttl(request: locks_pb2.AcquireRequest | locks_pb2.RenewRequest) -> timedelta:
    if not request.HasField("ttl"):
        raise InvalidArgument("ttl is required: a lease ends by itself")
    return duration(request.ttl, "ttl", positive=True)


class LocksService(locks_pb2_grpc.LocksServicer):
    def __init__(self, core: Coordinator) -> None:
        self._core = core

    async def Acquire(self, request: locks_pb2.AcquireRequest, context: Ctx) -> locks_pb2.Lease:
        wait = duration(request.wait, "wait") if request.HasField("wait") else timedelta(0)
        return await self._core.acquire_lock(
            request.name, _ttl(request), wait, shared=request.shared, by=current_principal()
        )

    async def Renew(self, request: locks_pb2.RenewRequest, context: Ctx) -> locks_pb2.Lease:
        return await self._core.renew_lock(
            request.name, request.token, _ttl(request), by=current_principal()
        )

    async def Release(self, request: locks_pb2.ReleaseRequest, context: Ctx) -> locks_pb2.Lease:
        return await self._core.release_lock(request.name, request.token, by=current_principal())
