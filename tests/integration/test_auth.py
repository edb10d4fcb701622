"""Authentication and roles, over real channels: every method, every role, tenants, audit."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from shoal import AsyncClient, shell
from shoal._reflection import REFLECTION_SERVICES
from shoal.config import CoordinatorSettings, NodeSettings
from shoal.coordinator.server import SERVICE_NAMES, CoordinatorServer
from shoal.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from shoal.node.agent import NodeAgent
from shoal.specs import is_final
from shoal.v1 import admin_pb2, locks_pb2, node_pb2, task_pb2, tasks_pb2

from .harness import BIN, STARTUP, Mesh, collect, eventually, run_tool

pytestmark = pytest.mark.timeout(60)

OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
REFLECTION = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name


def path_of(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


async def call_status(
    channel: grpc.aio.Channel, method: MethodDescriptor, request: bytes, token: str = ""
) -> grpc.StatusCode:
    """Call any method with raw request bytes; its status (OK once a stream answers)."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    path = path_of(method)
    try:
        if method.client_streaming:
            factory = channel.stream_stream if method.server_streaming else channel.stream_unary
            call = factory(path)(metadata=metadata, timeout=10)
            await call.write(request)
            if method.server_streaming:
                await call.read()
            else:
                await call.done_writing()
                await call
        elif method.server_streaming:
            call = channel.unary_stream(path)(request, metadata=metadata, timeout=10)
            await call.read()
        else:
            await channel.unary_unary(path)(request, metadata=metadata, timeout=10)
            return OK
    except grpc.aio.AioRpcError as err:
        return err.code()
    code = OK if call.done() is False else await call.code()
    call.cancel()
    return code


async def reflected_services(channel: grpc.aio.Channel, token: str) -> set[str]:
    stub = channel.stream_stream(
        f"/{REFLECTION}/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    call = stub(metadata=(("authorization", f"Bearer {token}"),), timeout=10)
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    response = await call.read()
    call.cancel()
    return {s.name for s in response.list_services_response.service}


def methods_of(services: set[str]) -> list[MethodDescriptor]:
    pool = descriptor_pool.Default()
    return [m for name in sorted(services) for m in pool.FindServiceByName(name).methods]


# -- 1. nothing without credentials --------------------------------------------------------


async def test_every_method_of_every_service_refuses_a_caller_without_credentials(
    mesh: Mesh,
) -> None:
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        services = await reflected_services(channel, mesh.token)
        assert services == {*SERVICE_NAMES, HEALTH, *REFLECTION_SERVICES}
        coordinator = {
            path_of(m): await call_status(channel, m, b"")
            for m in methods_of(services)
            if m.name != "Identify"
        }
        # Identify is open (a node has the coordinator it found prove itself before it sends
        # its token); it proves nothing for a token id it did not issue, or for another address.
        identify = channel.unary_unary(
            "/shoal.v1.NodeGateway/Identify",
            request_serializer=node_pb2.Challenge.SerializeToString,
            response_deserializer=node_pb2.Proof.FromString,
        )
        for challenge, code in (
            (node_pb2.Challenge(), grpc.StatusCode.INVALID_ARGUMENT),
            (
                node_pb2.Challenge(token_id="0", nonce=b"n" * 32, address="192.0.2.1:7070"),
                UNAUTHENTICATED,
            ),
            (
                node_pb2.Challenge(token_id="0", nonce=b"n" * 32, address=mesh.address),
                UNAUTHENTICATED,
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await identify(challenge, timeout=10)
            assert denied.value.code() == code, denied.value
    async with grpc.aio.insecure_channel(mesh.node_address) as channel:
        node_services = await reflected_services(channel, mesh.token)
        assert node_services == {
            node_pb2.DESCRIPTOR.services_by_name["Node"].full_name,
            HEALTH,
            *REFLECTION_SERVICES,
        }
        node = {
            path_of(m): await call_status(channel, m, b"")
            for m in methods_of(node_services)
            if m.name != "Attach"
        }
        # Attach is open: the caller proves itself inside the stream. Asked to, it cannot.
        attach = channel.stream_stream(
            "/shoal.v1.Node/Attach",
            request_serializer=node_pb2.CoordinatorMessage.SerializeToString,
            response_deserializer=node_pb2.NodeMessage.FromString,
        )(timeout=10)
        challenge = await attach.read()
        assert challenge.WhichOneof("msg") == "challenge" and len(challenge.challenge.nonce) == 32
        await attach.write(node_pb2.CoordinatorMessage(proof=node_pb2.Proof(mac=b"x" * 32)))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await attach.read()  # no Hello, no token
        assert refused.value.code() == UNAUTHENTICATED

    for statuses in (coordinator, node):
        health = {p: c for p, c in statuses.items() if p.startswith(f"/{HEALTH}/")}
        assert set(health.values()) == {OK}, health
        rest = {p: c for p, c in statuses.items() if p not in health}
        assert rest and set(rest.values()) == {UNAUTHENTICATED}, rest
    # 7 Tasks, 16 Admin, Connect, 3 Locks, reflection (v1, v1alpha), 3 health
    assert len(coordinator) == 33


async def test_garbage_revoked_and_expired_tokens_are_refused(mesh: Mesh) -> None:
    revoked = await mesh.client.create_token(
        admin_pb2.CreateTokenRequest(name="gone", role=admin_pb2.ROLE_READER)
    )
    await mesh.client.revoke_token("gone")
    expiring = admin_pb2.CreateTokenRequest(name="brief", role=admin_pb2.ROLE_READER)
    expiring.ttl.FromMilliseconds(300)
    brief = await mesh.client.create_token(expiring)
    async with AsyncClient(mesh.address, token=brief.token) as client:
        await client.list()  # valid while it lasts
        await asyncio.sleep(0.35)  # the token's own lifetime, not a wait for the server
        with pytest.raises(Unauthenticated, match="expired"):
            await client.list()
    for token, why in [
        ("not-a-token", "malformed"),
        ("shoal_000000000000_forged", "invalid"),
        (revoked.token, "revoked"),
        (mesh.token[:-2] + "xx", "invalid"),
    ]:
        async with AsyncClient(mesh.address, token=token) as client:
            with pytest.raises(Unauthenticated, match=why):
                await client.list()


# -- 2. roles x methods --------------------------------------------------------------------


@dataclass
class Fixture:
    mesh: Mesh
    tokens: dict[str, str]
    task_id: str


ROLES = ("admin", "submitter", "reader", "node")
# method -> roles besides admin that may call it; every other role gets PERMISSION_DENIED.
EXPECTED: dict[str, set[str]] = {
    "/shoal.v1.Tasks/Submit": {"submitter"},
    "/shoal.v1.Tasks/SubmitBatch": {"submitter"},
    "/shoal.v1.Tasks/Cancel": {"submitter"},
    **{f"/shoal.v1.Locks/{m}": {"submitter"} for m in ("Acquire", "Renew", "Release")},
    "/shoal.v1.Tasks/Get": {"submitter", "reader"},
    "/shoal.v1.Tasks/Wait": {"submitter", "reader"},
    "/shoal.v1.Tasks/List": {"submitter", "reader"},
    "/shoal.v1.Tasks/Watch": {"submitter", "reader"},
    "/shoal.v1.Admin/ListNodes": {"reader"},
    "/shoal.v1.Admin/GetOverview": {"submitter", "reader"},
    "/shoal.v1.Admin/CreateToken": set(),
    "/shoal.v1.Admin/ListTokens": set(),
    "/shoal.v1.Admin/RevokeToken": set(),
    **{
        f"/shoal.v1.Admin/{m}Schedule": set()
        for m in ("Create", "Delete", "Pause", "Resume", "Run")
    },
    "/shoal.v1.Admin/Drain": set(),
    "/shoal.v1.Admin/Undrain": set(),
    **{
        f"/shoal.v1.Admin/{m}": set() for m in ("SetQuota", "ListQuotas", "DeleteQuota", "GetUsage")
    },
    "/shoal.v1.Admin/ListSchedules": set(),
    "/shoal.v1.NodeGateway/Connect": {"node"},
    "/shoal.v1.NodeGateway/Identify": {"submitter", "reader", "node"},  # open
    **{f"/{name}/ServerReflectionInfo": set() for name in REFLECTION_SERVICES},
    f"/{HEALTH}/Check": {"submitter", "reader", "node"},
    f"/{HEALTH}/Watch": {"submitter", "reader", "node"},
    f"/{HEALTH}/List": {"submitter", "reader", "node"},
}


def _requests(f: Fixture) -> dict[str, Callable[[], Awaitable[Message]]]:
    spec = shell(["true"])
    made = 0

    async def token_to_revoke() -> Message:
        nonlocal made
        made += 1
        name = f"throwaway-{made}"
        await f.mesh.client.create_token(
            admin_pb2.CreateTokenRequest(name=name, role=admin_pb2.ROLE_READER)
        )
        return admin_pb2.RevokeTokenRequest(token=name)

    async def new_token_request() -> Message:
        nonlocal made
        made += 1
        return admin_pb2.CreateTokenRequest(name=f"made-{made}", role=admin_pb2.ROLE_READER)

    async def new_schedule() -> Message:
        nonlocal made
        made += 1
        schedule = admin_pb2.Schedule(name=f"every-{made}", spec=spec)
        schedule.every.FromSeconds(3600)
        return schedule

    async def schedule_to_delete() -> Message:
        schedule = await new_schedule()
        assert isinstance(schedule, admin_pb2.Schedule)
        await f.mesh.client.create_schedule(schedule)
        return admin_pb2.ScheduleRef(name=schedule.name)

    lease_names = iter(range(1_000_000))

    async def lease_request() -> Message:
        ttl = Duration(seconds=30)
        return locks_pb2.AcquireRequest(name=f"auth-{next(lease_names)}", ttl=ttl)

    def held_lease(*, renew: bool) -> Callable[[], Awaitable[Message]]:
        async def make() -> Message:
            name = f"auth-{next(lease_names)}"
            # Held by the submitter: it may renew and release it, and so may an admin, which
            # names a tenant's lock in full (as the lease does).
            async with AsyncClient(f.mesh.address, token=f.tokens["submitter"]) as holder:
                lease = await holder.acquire_lock(name, ttl=timedelta(seconds=30))
            name = lease.name
            if renew:
                return locks_pb2.RenewRequest(name=name, token=lease.token, ttl=Duration(seconds=9))
            return locks_pb2.ReleaseRequest(name=name, token=lease.token)

        return make

    async def quota_to_delete() -> Message:
        await f.mesh.client.set_quota(admin_pb2.Quota(key="gone", rate=1))
        return admin_pb2.QuotaRef(key="gone")

    def const(message: Message) -> Callable[[], Awaitable[Message]]:
        async def make() -> Message:
            return message

        return make

    return {
        "/shoal.v1.Tasks/Submit": const(tasks_pb2.SubmitRequest(spec=spec)),
        "/shoal.v1.Tasks/SubmitBatch": const(tasks_pb2.SubmitBatchRequest(specs=[spec])),
        "/shoal.v1.Tasks/Cancel": const(tasks_pb2.CancelRequest(task_id=f.task_id)),
        "/shoal.v1.Tasks/Get": const(tasks_pb2.GetRequest(task_id=f.task_id)),
        "/shoal.v1.Tasks/Wait": const(tasks_pb2.WaitRequest(task_id=f.task_id)),
        "/shoal.v1.Tasks/List": const(tasks_pb2.ListRequest()),
        "/shoal.v1.Tasks/Watch": const(tasks_pb2.WatchRequest()),
        "/shoal.v1.Admin/ListNodes": const(admin_pb2.ListNodesRequest()),
        "/shoal.v1.Admin/CreateToken": new_token_request,
        "/shoal.v1.Admin/ListTokens": const(admin_pb2.ListTokensRequest()),
        "/shoal.v1.Admin/RevokeToken": token_to_revoke,
        "/shoal.v1.Admin/CreateSchedule": new_schedule,
        "/shoal.v1.Admin/ListSchedules": const(admin_pb2.ListSchedulesRequest()),
        "/shoal.v1.Admin/PauseSchedule": const(admin_pb2.ScheduleRef(name="nightly")),
        "/shoal.v1.Admin/ResumeSchedule": const(admin_pb2.ScheduleRef(name="nightly")),
        "/shoal.v1.Admin/RunSchedule": const(admin_pb2.ScheduleRef(name="nightly")),
        "/shoal.v1.Admin/DeleteSchedule": schedule_to_delete,
        "/shoal.v1.Admin/Drain": const(admin_pb2.DrainRequest(node_id=f.mesh.node.node_id)),
        "/shoal.v1.Admin/Undrain": const(admin_pb2.DrainRequest(node_id=f.mesh.node.node_id)),
        "/shoal.v1.Admin/SetQuota": const(admin_pb2.Quota(key="team:ml", concurrency=4)),
        "/shoal.v1.Admin/ListQuotas": const(admin_pb2.ListQuotasRequest()),
        "/shoal.v1.Admin/DeleteQuota": quota_to_delete,
        "/shoal.v1.Admin/GetUsage": const(admin_pb2.UsageRequest()),
        "/shoal.v1.Admin/GetOverview": const(admin_pb2.OverviewRequest()),
        "/shoal.v1.Locks/Acquire": lease_request,
        "/shoal.v1.Locks/Renew": held_lease(renew=True),
        "/shoal.v1.Locks/Release": held_lease(renew=False),
        "/shoal.v1.NodeGateway/Connect": const(
            node_pb2.NodeMessage(hello=node_pb2.Hello(info=node_pb2.NodeInfo(node_id="edge-1")))
        ),
        "/shoal.v1.NodeGateway/Identify": const(
            node_pb2.Challenge(
                token_id=f.tokens["node"].split("_")[1],
                node_id="edge-1",
                address=f.mesh.address,
                nonce=b"n" * 32,
            )
        ),
        **{
            f"/{name}/ServerReflectionInfo": const(
                reflection_pb2.ServerReflectionRequest(list_services="")
            )
            for name in REFLECTION_SERVICES
        },
        f"/{HEALTH}/Check": const(health_pb2.HealthCheckRequest()),
        f"/{HEALTH}/Watch": const(health_pb2.HealthCheckRequest()),
        f"/{HEALTH}/List": const(health_pb2.HealthListRequest()),
    }


@pytest.fixture
async def roles(mesh: Mesh) -> Fixture:
    tokens = {"admin": mesh.token}
    for role, request in [
        ("submitter", admin_pb2.CreateTokenRequest(role=admin_pb2.ROLE_SUBMITTER, tenant="acme")),
        ("reader", admin_pb2.CreateTokenRequest(role=admin_pb2.ROLE_READER)),
        ("node", admin_pb2.CreateTokenRequest(role=admin_pb2.ROLE_NODE, node_id="edge-1")),
    ]:
        request.name = f"{role}-token"
        tokens[role] = (await mesh.client.create_token(request)).token
    task = await mesh.client.submit(shell(["true"], tenant="acme"))
    await mesh.client.wait(task.id)
    nightly = admin_pb2.Schedule(name="nightly", spec=shell(["true"]), cron="0 3 * * *")
    await mesh.client.create_schedule(nightly)
    return Fixture(mesh, tokens, task.id)


async def test_each_role_gets_exactly_the_methods_it_should(roles: Fixture) -> None:
    requests = _requests(roles)
    pool = descriptor_pool.Default()
    got: dict[tuple[str, str], grpc.StatusCode] = {}
    async with grpc.aio.insecure_channel(roles.mesh.address) as channel:
        for path in EXPECTED:
            service, name = path[1:].rsplit("/", 1)
            method = pool.FindServiceByName(service).methods_by_name[name]
            for role in ROLES:
                request = await requests[path]()
                got[path, role] = await call_status(
                    channel, method, request.SerializeToString(), roles.tokens[role]
                )

    expected = {
        (path, role): OK if role == "admin" or role in allowed else DENIED
        for path, allowed in EXPECTED.items()
        for role in ROLES
    }
    assert got == expected
    assert set(EXPECTED) == {
        path_of(m) for m in methods_of({*SERVICE_NAMES, HEALTH, *REFLECTION_SERVICES})
    }


async def test_a_tenant_sees_and_touches_only_its_own_tasks(mesh: Mesh) -> None:
    clients = {}
    for tenant in ("acme", "globex"):
        made = await mesh.client.create_token(
            admin_pb2.CreateTokenRequest(name=tenant, role=admin_pb2.ROLE_SUBMITTER, tenant=tenant)
        )
        clients[tenant] = AsyncClient(mesh.address, token=made.token)
    acme, globex = clients["acme"], clients["globex"]
    try:
        watch = globex.watch(since=0)
        mine = await acme.submit(shell(["sleep", "30"]))  # tenant filled in from the token
        theirs = await globex.submit(shell(["true"]))
        assert mine.spec.tenant == "acme" and theirs.spec.tenant == "globex"

        # Another tenant's task id is answered as an unknown one: ids cannot be probed.
        for task_id in (mine.id, "0123456789abcdef"):
            for probe in (globex.get(task_id), globex.wait(task_id), globex.cancel(task_id)):
                with pytest.raises(NotFound, match=f"no task '{task_id}'"):
                    await probe
            with pytest.raises(InvalidArgument, match=f"no task '{task_id}'"):
                await globex.submit(shell(["true"], depends_on=[task_id]))
        for attempt in (globex.submit(shell(["true"], tenant="acme")), globex.list(tenant="acme")):
            with pytest.raises(PermissionDenied):
                await attempt
        with pytest.raises(PermissionDenied):
            await anext(globex.watch(since=0, tenant="acme"))
        assert [t.id for t in await globex.list()] == [theirs.id]
        # Globex's watch, even of acme's task id, carries only globex's events.
        seen = await collect(
            watch,
            lambda e: e.task_id == theirs.id and e.state == task_pb2.TASK_STATE_SUCCEEDED,
        )
        assert {e.task_id for e in seen} == {theirs.id}
        assert (await acme.get(mine.id)).state != task_pb2.TASK_STATE_CANCELLED
        await acme.cancel(mine.id)
    finally:
        for client in clients.values():
            await client.close()


async def _until_final(client: AsyncClient, task: task_pb2.Task) -> list[task_pb2.Event]:
    watch = client.watch(since=task.created_seq - 1, task_ids=[task.id])
    return await collect(watch, lambda e: is_final(e.state))


async def test_every_event_names_the_principal_that_caused_it(mesh: Mesh) -> None:
    made = await mesh.client.create_token(
        admin_pb2.CreateTokenRequest(name="alice", role=admin_pb2.ROLE_SUBMITTER)
    )
    async with AsyncClient(mesh.address, token=made.token) as alice:
        done = await alice.submit(shell(["true"]))
        events = await _until_final(alice, done)
        blocked = await alice.submit(shell(["sleep", "30"]))
        await mesh.client.cancel(blocked.id)  # by the admin
        cancelled = await _until_final(alice, blocked)

    by_state = {task_pb2.TaskState.Name(e.state): e.principal for e in events}
    assert by_state["TASK_STATE_QUEUED"] == "alice"
    assert by_state["TASK_STATE_ASSIGNED"] == "coordinator"
    # The mesh's node connects with the local admin token.
    assert by_state["TASK_STATE_RUNNING"] == by_state["TASK_STATE_SUCCEEDED"] == "local-admin"
    assert done.submitted_by == "alice"
    assert cancelled[-1].state == task_pb2.TASK_STATE_CANCELLED
    assert cancelled[-1].principal == "local-admin"  # the admin's cancel, audited


# -- safe defaults and local use -----------------------------------------------------------


async def test_a_non_loopback_bind_without_auth_refuses_to_start(tmp_path: Path) -> None:
    server = CoordinatorServer(
        CoordinatorSettings(listen="0.0.0.0:0", data_dir=tmp_path, auth=False)
    )
    with pytest.raises(FailedPrecondition, match="auth off"):
        await server.start()
    assert not (tmp_path / "shoal.db").exists()  # refused before anything was touched


async def test_the_admin_token_file_is_private_and_kept_across_restarts(
    mesh: Mesh, tmp_path: Path
) -> None:
    path = mesh.coordinator.admin_token_path
    assert path.stat().st_mode & 0o777 == 0o600
    token = path.read_text()
    await mesh.node.stop()
    await mesh.coordinator.stop()
    again = CoordinatorServer(mesh.coordinator.settings)
    await again.start()
    try:
        assert path.read_text() == token
    finally:
        await again.stop()


async def test_token_commands_create_list_and_revoke(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHOAL_TOKEN", mesh.token)
    monkeypatch.setenv("SHOAL_COORDINATOR", mesh.address)
    token_cmd = [str(BIN / "shoal"), "token"]
    created = await run_tool([*token_cmd, "create", "ci", "--role", "reader"])
    listed = await run_tool([*token_cmd, "ls"])
    revoked = await run_tool([*token_cmd, "revoke", "ci"])

    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("shoal_")
    assert "ci" in listed.stdout and "reader" in listed.stdout
    assert token not in listed.stdout  # secrets are never listed
    assert revoked.returncode == 0, revoked.stderr
    async with AsyncClient(mesh.address, token=token) as client:
        with pytest.raises(Unauthenticated, match="revoked"):
            await client.list()


async def test_malformed_request_bytes_are_invalid_argument_for_every_shape(mesh: Mesh) -> None:
    pool = descriptor_pool.Default()
    garbage = b"\x0a\xff\xff\xff\xff\x0f"  # a length-delimited field longer than the message
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        got = {
            name: await call_status(channel, pool.FindMethodByName(name), garbage, token=mesh.token)
            for name in (
                "shoal.v1.Tasks.Submit",  # unary
                "shoal.v1.Tasks.Watch",  # server streaming
                "shoal.v1.NodeGateway.Connect",  # bidirectional
            )
        }
        assert set(got.values()) == {grpc.StatusCode.INVALID_ARGUMENT}, got
        assert await mesh.client.list() == []


async def test_revoking_a_token_ends_the_streams_opened_with_it(mesh: Mesh) -> None:
    reader = await mesh.client.create_token(
        admin_pb2.CreateTokenRequest(name="watcher", role=admin_pb2.ROLE_READER)
    )
    node_token = await mesh.client.create_token(
        admin_pb2.CreateTokenRequest(name="edge-2", role=admin_pb2.ROLE_NODE)
    )
    node = NodeAgent(
        NodeSettings(
            coordinator=mesh.address,
            node_id="edge-2",
            listen="127.0.0.1:0",
            token=node_token.token,
            reconnect_max=timedelta(milliseconds=200),
        )
    )
    await node.start()
    try:
        await asyncio.wait_for(node.connected.wait(), STARTUP)
        async with AsyncClient(mesh.address, token=reader.token) as watcher:
            events = watcher.watch()
            first = asyncio.ensure_future(anext(events))
            await mesh.client.revoke_token("watcher")
            await mesh.client.revoke_token("edge-2")
            await mesh.client.submit(shell(["true"]))  # an event the revoked watcher must not get
            with pytest.raises(Unauthenticated, match="revoked"):
                await first

        async def node_gone() -> None:
            assert "edge-2" not in {n.info.node_id for n in await mesh.client.nodes()}
            assert not node.connected.is_set()

        await eventually(node_gone)
    finally:
        await node.stop()


async def test_idempotency_keys_are_scoped_to_the_tenant(mesh: Mesh) -> None:
    clients = []
    for tenant in ("acme", "globex"):
        made = await mesh.client.create_token(
            admin_pb2.CreateTokenRequest(name=tenant, role=admin_pb2.ROLE_SUBMITTER, tenant=tenant)
        )
        clients.append(AsyncClient(mesh.address, token=made.token))
    acme, globex = clients
    try:
        first = await acme.submit(shell(["true"], idempotency_key="nightly"))
        other = await globex.submit(shell(["true"], idempotency_key="nightly"))
        again = await acme.submit(shell(["true"], idempotency_key="nightly"))
    finally:
        for client in clients:
            await client.close()
    assert other.id != first.id and other.spec.tenant == "globex"
    assert again.id == first.id
