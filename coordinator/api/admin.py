"""The Admin service: nodes, tokens, schedules, drain and quotas."""

from __future__ import annotations

import logging
from datetime import timedelta

from shoal._gate import current_principal
from shoal.auth import Role
from shoal.coordinator.api.context import Ctx
from shoal.coordinator.engine import Coordinator
from shoal.coordinator.store import TokenRow
from shoal.errors import InvalidArgument
from shoal.specs import duration, timestamp
from shoal.v1 import admin_pb2, admin_pb2_grpc

__all__ = ["AdminService"]

_log = logging.getLogger("shoal.coordinator")
_DEFAULT_DRAIN_GRACE = timedelta(seconds=30)

_ROLES = {
    admin_pb2.ROLE_ADMIN: Role.ADMIN,
    admin_pb2.ROLE_SUBMITTER: Role.SUBMITTER,
    admin_pb2.ROLE_READER: Role.READER,
    admin_pb2.ROLE_NODE: Role.NODE,
}
_ROLE_ENUMS = {role: value for value, role in _ROLES.items()}


def _token_info(row: TokenRow) -> admin_pb2.TokenInfo:
    return admin_pb2.TokenInfo(
        id=row.id,
        name=row.name,
        role=_ROLE_ENUMS[Role(row.role)],
        tenant=row.tenant,
        node_id=row.node_id,
        executors=row.executors,
        labels=row.labels,
        created_at=timestamp(row.created_at),
        expires_at=timestamp(row.expires_at),
        revoked_at=timestamp(row.revoked_at),
        created_by=row.created_by,
    )


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, core: Coordinator) -> None:
        self._core = core

    async def ListNodes(
        self, request: admin_pb2.ListNodesRequest, context: Ctx
    ) -> admin_pb2.ListNodesResponse:
        return admin_pb2.ListNodesResponse(nodes=self._core.nodes())

    async def CreateToken(
        self, request: admin_pb2.CreateTokenRequest, context: Ctx
    ) -> admin_pb2.CreateTokenResponse:
        role = _ROLES.get(request.role)
        if role is None:
            raise InvalidArgument("role must be one of admin, submitter, reader, node")
        made = await self._core.create_token(
            name=request.name,
            role=role,
            tenant=request.tenant,
            node_id=request.node_id,
            executors=list(request.executors),
            labels=dict(request.labels),
            ttl=duration(request.ttl, "ttl", positive=True) if request.HasField("ttl") else None,
            created_by=current_principal().name,
        )
        _log.info("token %r (%s) created by %s", made.row.name, role, made.row.created_by)
        return admin_pb2.CreateTokenResponse(info=_token_info(made.row), token=made.token)

    async def ListTokens(
        self, request: admin_pb2.ListTokensRequest, context: Ctx
    ) -> admin_pb2.ListTokensResponse:
        rows = self._core.token_rows(include_revoked=request.include_revoked)
        return admin_pb2.ListTokensResponse(tokens=[_token_info(r) for r in rows])

    async def RevokeToken(
        self, request: admin_pb2.RevokeTokenRequest, context: Ctx
    ) -> admin_pb2.TokenInfo:
        row = await self._core.revoke_token(request.token)
        _log.info("token %r revoked by %s", row.name, current_principal().name)
        return _token_info(row)

    async def CreateSchedule(self, request: admin_pb2.Schedule, context: Ctx) -> admin_pb2.Schedule:
        return await self._core.create_schedule(request, by=current_principal())

    async def ListSchedules(
        self, request: admin_pb2.ListSchedulesRequest, context: Ctx
    ) -> admin_pb2.ListSchedulesResponse:
        return admin_pb2.ListSchedulesResponse(schedules=self._core.schedules())

    async def DeleteSchedule(
        self, request: admin_pb2.ScheduleRef, context: Ctx
    ) -> admin_pb2.Schedule:
        return await self._core.delete_schedule(request.name)

    async def PauseSchedule(
        self, request: admin_pb2.ScheduleRef, context: Ctx
    ) -> admin_pb2.Schedule:
        return await self._core.pause_schedule(request.name, paused=True)

    async def ResumeSchedule(
        self, request: admin_pb2.ScheduleRef, context: Ctx
    ) -> admin_pb2.Schedule:
        return await self._core.pause_schedule(request.name, paused=False)

    async def RunSchedule(self, request: admin_pb2.ScheduleRef, context: Ctx) -> admin_pb2.Schedule:
        _log.info("schedule %r run now by %s", request.name, current_principal().name)
        return await self._core.run_schedule(request.name)

    async def Drain(self, request: admin_pb2.DrainRequest, context: Ctx) -> admin_pb2.NodeStatus:
        grace = (
            duration(request.grace, "grace") if request.HasField("grace") else _DEFAULT_DRAIN_GRACE
        )
        _log.info("node %s drained by %s", request.node_id, current_principal().name)
        return self._core.drain(request.node_id, grace, leave=request.leave)

    async def Undrain(self, request: admin_pb2.DrainRequest, context: Ctx) -> admin_pb2.NodeStatus:
        _log.info("node %s undrained by %s", request.node_id, current_principal().name)
        return self._core.undrain(request.node_id)

    async def SetQuota(self, request: admin_pb2.Quota, context: Ctx) -> admin_pb2.Quota:
        _log.info("quota on %r set by %s", request.key, current_principal().name)
        return await self._core.set_quota(request)

    async def ListQuotas(
        self, request: admin_pb2.ListQuotasRequest, context: Ctx
    ) -> admin_pb2.ListQuotasResponse:
        return admin_pb2.ListQuotasResponse(quotas=self._core.quota_list())

    async def DeleteQuota(self, request: admin_pb2.QuotaRef, context: Ctx) -> admin_pb2.Quota:
        _log.info("quota on %r deleted by %s", request.key, current_principal().name)
        return await self._core.delete_quota(request.key)

    async def GetUsage(
        self, request: admin_pb2.UsageRequest, context: Ctx
    ) -> admin_pb2.UsageResponse:
        return admin_pb2.UsageResponse(usage=self._core.usage(request.key))

    async def GetOverview(
        self, request: admin_pb2.OverviewRequest, context: Ctx
    ) -> admin_pb2.Overview:
        return self._core.overview(by=current_principal())
