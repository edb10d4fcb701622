"""The gRPC surface as a user meets it with the real `grpcurl -plaintext`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from shoal._reflection import REFLECTION_SERVICES
from shoal.v1 import node_pb2

from .harness import Completed, Mesh, run_tool

pytestmark = pytest.mark.timeout(30)


async def grpcurl_call(
    grpcurl: Path,
    address: str,
    method: str,
    body: dict[str, Any] | None = None,
    *extra: str,
    token: str = "",
) -> Completed:
    argv = [str(grpcurl), "-plaintext", *extra]
    if token:
        argv += ["-H", f"authorization: Bearer {token}"]
    if body is not None:
        argv += ["-d", json.dumps(body)]
    return await run_tool([*argv, address, method])


def ok_json(done: Completed) -> dict[str, Any]:
    assert done.returncode == 0, f"grpcurl failed ({done.returncode}): {done.stderr}"
    out: dict[str, Any] = json.loads(done.stdout)
    return out


def node_protoset(tmp_path: Path) -> Path:
    """The node serves no reflection: describe its services to grpcurl from our descriptors
    (each file after the files it imports, as grpcurl wants them)."""
    files = descriptor_pb2.FileDescriptorSet()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name not in added:
            added.add(file.name)
            for dependency in file.dependencies:
                add(dependency)
            file.CopyToProto(files.file.add())

    add(health_pb2.DESCRIPTOR)
    add(node_pb2.DESCRIPTOR)
    path = tmp_path / "node.protoset"
    path.write_bytes(files.SerializeToString())
    return path


async def test_list_by_reflection_shows_every_service(mesh: Mesh, grpcurl: Path) -> None:
    done = await grpcurl_call(grpcurl, mesh.address, "list", token=mesh.token)
    anonymous = await grpcurl_call(grpcurl, mesh.address, "list")

    assert done.returncode == 0, done.stderr
    assert anonymous.returncode != 0
    assert "Unauthenticated" in anonymous.stderr  # reflection is for admins
    services = set(done.stdout.split())
    assert {
        "shoal.v1.Tasks",
        "shoal.v1.Admin",
        "shoal.v1.NodeGateway",
        "grpc.health.v1.Health",
    } <= services


async def test_node_lists_its_services_by_reflection_to_token_holders(
    mesh: Mesh, grpcurl: Path
) -> None:
    done = await grpcurl_call(grpcurl, mesh.node_address, "list", token=mesh.token)
    bearer = f"authorization: Bearer {mesh.token}"
    described = await run_tool(
        [str(grpcurl), "-plaintext", "-H", bearer, mesh.node_address, "describe", "shoal.v1.Node"]
    )
    anonymous = await grpcurl_call(grpcurl, mesh.node_address, "list")

    assert done.returncode == 0, done.stderr
    assert set(done.stdout.split()) == {
        "shoal.v1.Node",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    assert described.returncode == 0, described.stderr
    assert "rpc Info ( .shoal.v1.InfoRequest ) returns ( .shoal.v1.NodeInfo )" in described.stdout
    assert anonymous.returncode != 0 and "Unauthenticated" in anonymous.stderr


async def reflect_v1(
    address: str, token: str, request: reflection_pb2.ServerReflectionRequest
) -> reflection_pb2.ServerReflectionResponse:
    """One request to grpc.reflection.v1 (its messages are v1alpha's on the wire)."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )(metadata=(("authorization", f"Bearer {token}"),), timeout=10)
        await call.write(request)
        response: reflection_pb2.ServerReflectionResponse = await call.read()
        call.cancel()
        return response


async def test_coordinator_and_node_serve_reflection_v1(mesh: Mesh) -> None:
    listing = reflection_pb2.ServerReflectionRequest(list_services="")
    symbol = reflection_pb2.ServerReflectionRequest(file_containing_symbol="shoal.v1.Tasks")
    coordinator = await reflect_v1(mesh.address, mesh.token, listing)
    node = await reflect_v1(mesh.node_address, mesh.token, listing)
    tasks_file = await reflect_v1(mesh.address, mesh.token, symbol)
    v1_file = await reflect_v1(
        mesh.address,
        mesh.token,
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=REFLECTION_SERVICES[0]),
    )

    assert {s.name for s in coordinator.list_services_response.service} >= {
        "shoal.v1.Tasks",
        "shoal.v1.Admin",
        *REFLECTION_SERVICES,
    }
    assert {s.name for s in node.list_services_response.service} >= {
        "shoal.v1.Node",
        *REFLECTION_SERVICES,
    }
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in tasks_file.file_descriptor_response.file_descriptor_proto
    ]
    assert "shoal/v1/tasks.proto" in {f.name for f in files}
    (v1,) = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in v1_file.file_descriptor_response.file_descriptor_proto
    ]
    assert v1.package == "grpc.reflection.v1"
    assert v1.service[0].method[0].input_type == ".grpc.reflection.v1.ServerReflectionRequest"


async def test_submit_as_json_then_wait_reads_stdout(mesh: Mesh, grpcurl: Path) -> None:
    submitted = ok_json(
        await grpcurl_call(
            grpcurl,
            mesh.address,
            "shoal.v1.Tasks/Submit",
            {"spec": {"shell": {"argv": ["echo", "hello"]}}},
            token=mesh.token,
        )
    )
    assert submitted["created"] is True
    task_id = submitted["task"]["id"]

    task = ok_json(
        await grpcurl_call(
            grpcurl,
            mesh.address,
            "shoal.v1.Tasks/Wait",
            {"task_id": task_id, "timeout": "15s"},
            token=mesh.token,
        )
    )

    assert task["id"] == task_id
    assert task["state"] == "TASK_STATE_SUCCEEDED"
    assert task["result"]["stdout"] == "hello\n"
    assert task["node_id"] == mesh.node.node_id

    # Submit that waits: one call, answered with the task as it ended.
    ran = ok_json(
        await grpcurl_call(
            grpcurl,
            mesh.address,
            "shoal.v1.Tasks/Submit",
            {"spec": {"shell": {"argv": ["echo", "at once"]}}, "wait": True},
            token=mesh.token,
        )
    )
    assert ran["created"] is True
    assert ran["task"]["state"] == "TASK_STATE_SUCCEEDED"
    assert ran["task"]["result"]["stdout"] == "at once\n"


async def test_health_serving_on_coordinator_and_node(
    mesh: Mesh, grpcurl: Path, tmp_path: Path
) -> None:
    # Health is open to probes: no token, and the schema from a protoset (reflection is for admins).
    protoset = ["-protoset", str(node_protoset(tmp_path))]
    health = "grpc.health.v1.Health/Check"
    coordinator = ok_json(await grpcurl_call(grpcurl, mesh.address, health, {}, *protoset))
    tasks_service = ok_json(
        await grpcurl_call(grpcurl, mesh.address, health, {"service": "shoal.v1.Tasks"}, *protoset)
    )
    node = ok_json(await grpcurl_call(grpcurl, mesh.node_address, health, {}, *protoset))
    info = ok_json(
        await grpcurl_call(
            grpcurl, mesh.node_address, "shoal.v1.Node/Info", {}, *protoset, token=mesh.token
        )
    )
    anonymous_info = await grpcurl_call(
        grpcurl, mesh.node_address, "shoal.v1.Node/Info", {}, *protoset
    )

    assert anonymous_info.returncode != 0 and "Unauthenticated" in anonymous_info.stderr
    assert coordinator == {"status": "SERVING"}
    assert tasks_service == {"status": "SERVING"}
    assert node == {"status": "SERVING"}
    assert info["node_id"] == mesh.node.node_id
    assert "shell" in info["executors"]


async def test_bad_input_is_invalid_argument_and_stores_nothing(mesh: Mesh, grpcurl: Path) -> None:
    done = await grpcurl_call(
        grpcurl, mesh.address, "shoal.v1.Tasks/Submit", {"spec": {"shell": {}}}, token=mesh.token
    )

    assert done.returncode != 0
    assert "InvalidArgument" in done.stderr
    assert "spec.shell" in done.stderr  # the BadRequest detail names the field
    listed = ok_json(
        await grpcurl_call(grpcurl, mesh.address, "shoal.v1.Tasks/List", {}, token=mesh.token)
    )
    assert listed.get("tasks", []) == []
