"""GET /api/openapi.json: an OpenAPI 3.1 document of the HTTP API, made from the descriptors
(the same ones the routes come from), so it cannot drift from what is served."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor

from shoal.coordinator.http.rpc import API_PREFIX, method_path, rpc_methods
from shoal.v1 import tasks_pb2

__all__ = ["openapi_document"]

_T = FieldDescriptor
_INT64 = {"type": ["string", "integer"], "format": "int64"}
_SCALARS: dict[int, dict[str, Any]] = {
    **{t: {"type": "number"} for t in (_T.TYPE_DOUBLE, _T.TYPE_FLOAT)},
    **{
        t: {"type": "integer", "format": "int32"}
        for t in (_T.TYPE_INT32, _T.TYPE_SINT32, _T.TYPE_SFIXED32, _T.TYPE_UINT32, _T.TYPE_FIXED32)
    },
    **{
        t: _INT64
        for t in (_T.TYPE_INT64, _T.TYPE_SINT64, _T.TYPE_SFIXED64, _T.TYPE_UINT64, _T.TYPE_FIXED64)
    },
    _T.TYPE_BOOL: {"type": "boolean"},
    _T.TYPE_STRING: {"type": "string"},
    _T.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
}
# Well-known types have a JSON form of their own.
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$"},
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array"},
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "required": ["@type"],
    },
    "google.protobuf.FieldMask": {"type": "string"},
}
_ERROR = {
    "type": "object",
    "properties": {
        "code": {"type": "string", "examples": ["invalid_argument"]},
        "message": {"type": "string"},
        "details": {"type": "array", "items": _WELL_KNOWN["google.protobuf.Any"]},
    },
    "required": ["code", "message"],
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


class _Schemas:
    """The schemas of messages, each once, named by full name."""

    def __init__(self) -> None:
        self.by_name: dict[str, Any] = {}

    def of_message(self, message: Descriptor) -> dict[str, Any]:
        if message.full_name in _WELL_KNOWN:
            return _WELL_KNOWN[message.full_name]
        if message.full_name not in self.by_name:
            self.by_name[message.full_name] = {}  # placed first: messages may nest themselves
            self.by_name[message.full_name] = {
                "type": "object",
                "properties": {f.json_name: self._field(f) for f in message.fields},
                "additionalProperties": False,
            }
        return _ref(message.full_name)

    def _field(self, field: FieldDescriptor) -> dict[str, Any]:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value = field.message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self._single(value)}
        single = self._single(field)
        return {"type": "array", "items": single} if field.is_repeated else single

    def _single(self, field: FieldDescriptor) -> dict[str, Any]:
        if field.enum_type is not None:
            return {"type": "string", "enum": [v.name for v in field.enum_type.values]}
        if field.message_type is not None:
            return self.of_message(field.message_type)
        return _SCALARS[field.type]


def _events_parameters() -> list[dict[str, Any]]:
    schemas = _Schemas()
    params = []
    for field in tasks_pb2.WatchRequest.DESCRIPTOR.fields:
        params.append(
            {
                "name": field.name,
                "in": "query",
                "schema": schemas._field(field),
                "explode": True,
                "description": "repeat it, or separate values by commas"
                if field.is_repeated
                else "",
            }
        )
    params.append(
        {
            "name": "Last-Event-ID",
            "in": "header",
            "schema": {"type": "string"},
            "description": "resume after this cursor (a browser sends it when it reconnects)",
        }
    )
    return params


def openapi_document(services: Mapping[ServiceDescriptor, Any], version: str) -> dict[str, Any]:
    """The document of the routes served for `services`."""
    schemas = _Schemas()
    error = {"description": "an error", "content": {"application/json": {"schema": _ref("Error")}}}
    paths: dict[str, Any] = {}
    for method in rpc_methods(services):
        paths[f"{API_PREFIX}{method_path(method)}"] = {
            "post": {
                "operationId": f"{method.containing_service.name}_{method.name}",
                "tags": [method.containing_service.full_name],
                "requestBody": {
                    "required": False,
                    "content": {
                        "application/json": {"schema": schemas.of_message(method.input_type)}
                    },
                },
                "responses": {
                    "200": {
                        "description": method.output_type.full_name,
                        "content": {
                            "application/json": {"schema": schemas.of_message(method.output_type)}
                        },
                    },
                    "default": error,
                },
            }
        }
    schemas.of_message(tasks_pb2.WatchResponse.DESCRIPTOR)
    paths[f"{API_PREFIX}/events"] = {
        "get": {
            "operationId": "events",
            "summary": "Tasks.Watch as Server-Sent Events: id = cursor, data = WatchResponse",
            "parameters": _events_parameters(),
            "responses": {
                "200": {
                    "description": "an event stream; an `error` event ends it",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}},
                },
                "default": error,
            },
        }
    }
    who = {
        "type": "object",
        "properties": {k: {"type": "string"} for k in ("name", "role", "tenant", "token_id")},
    }
    ok = {"200": {"description": "who", "content": {"application/json": {"schema": who}}}}
    paths[f"{API_PREFIX}/login"] = {
        "post": {
            "operationId": "login",
            "summary": "open a cookie session (sets shoal_session and shoal_csrf)",
            "security": [],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": {"token": {"type": "string"}},
                            "required": ["token"],
                        }
                    }
                },
            },
            "responses": {**ok, "default": error},
        }
    }
    paths[f"{API_PREFIX}/logout"] = {
        "post": {"operationId": "logout", "responses": {"200": {"description": "closed"}}}
    }
    paths[f"{API_PREFIX}/whoami"] = {"get": {"operationId": "whoami", "responses": ok}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Shoal HTTP API",
            "version": version,
            "description": (
                "Every unary method of the gRPC services as POST /api/<Service>/<Method>, with"
                " bodies in protobuf's JSON mapping. A call authenticated by the session cookie"
                " that changes anything carries X-CSRF-Token (the shoal_csrf cookie's value)."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": {**dict(sorted(schemas.by_name.items())), "Error": _ERROR},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "session": {"type": "apiKey", "in": "cookie", "name": "shoal_session"},
            },
        },
        "security": [{"bearer": []}, {"session": []}],
    }
