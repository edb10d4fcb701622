"""gRPC server reflection under both its names: grpc.reflection.v1 and the older v1alpha."""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

__all__ = ["REFLECTION_SERVICES", "serve_reflection"]

_V1ALPHA = reflection_pb2.DESCRIPTOR
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _v1_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """v1 is v1alpha renamed (same messages, same numbers): grpcio-reflection ships only the
    latter, so the former's descriptor is made from it, for clients that describe it."""
    proto = descriptor_pb2.FileDescriptorProto()
    _V1ALPHA.CopyToProto(proto)
    old, new = f".{_V1ALPHA.package}.", ".grpc.reflection.v1."
    proto.name, proto.package = _V1_FILE, new.strip(".")
    for message in proto.message_type:
        for field in message.field:
            if field.type_name:  # set only on message and enum fields
                field.type_name = field.type_name.replace(old, new, 1)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new, 1)
            method.output_type = method.output_type.replace(old, new, 1)
    return proto


def _v1_service_name() -> str:
    pool = descriptor_pool.Default()
    try:
        file = pool.FindFileByName(_V1_FILE)
    except KeyError:
        file = pool.AddSerializedFile(_v1_descriptor().SerializeToString())
    return str(file.services_by_name["ServerReflection"].full_name)


_V1 = _v1_service_name()
_METHOD = _V1ALPHA.services_by_name["ServerReflection"].methods[0].name
REFLECTION_SERVICES = (_V1, reflection.SERVICE_NAME)
"""The reflection services a Shoal server offers (its Gate's policy leaves them to admins)."""


def serve_reflection(server: grpc.aio.Server, names: tuple[str, ...]) -> None:
    """Register reflection, v1 and v1alpha, listing the named services and itself."""
    servicer = ReflectionServicer((*names, *REFLECTION_SERVICES))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    # The same servicer answers v1: its messages are v1alpha's on the wire.
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_V1, {_METHOD: v1}),))
