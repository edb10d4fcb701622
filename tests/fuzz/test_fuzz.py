"""Fuzzing: generated and mutated messages to every RPC of an in-process coordinator and node.

Requests are built from the protobuf descriptors alone (no strategy is written per message),
serialized, and often mutated on the wire. Every answer must be a clean status: never
INTERNAL or UNKNOWN, which mean an unhandled exception in a handler. Afterwards both servers
still serve, a real task still runs, nothing logged an error, and memory stayed bounded.

Calls run concurrently on the servers' event loop while Hypothesis draws the next ones, so a
call that blocks (Wait, a stream) costs no test time; answers are checked once all are in,
and a failure names each method and the smallest request bytes (hex) that reproduce it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import string
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import hypothesis
import psutil
import pytest
from google.protobuf import (
    descriptor_pool,
    duration_pb2,
    message_factory,
    text_format,
    timestamp_pb2,
)
from google.protobuf.descriptor import (
    Descriptor,
    FieldDescriptor,
    FileDescriptor,
    MethodDescriptor,
)
from google.protobuf.message import DecodeError, EncodeError, Message
from grpc._cython import cygrpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from shoal import AsyncClient, noop, shell
from shoal._reflection import REFLECTION_SERVICES
from shoal.auth import parse_token
from shoal.config import NodeSettings
from shoal.coordinator.server import SERVICE_NAMES
from shoal.node.agent import NodeAgent
from shoal.v1 import (
    admin_pb2,
    gateway_pb2,
    locks_pb2,
    node_pb2,
    task_pb2,
    tasks_pb2,
    tasks_pb2_grpc,
)

from .conftest import Servers

_T = TypeVar("_T")
_F = FieldDescriptor
_Metadata = tuple[tuple[str, str], ...]

HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
REFLECTION = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
NODE = node_pb2.DESCRIPTOR.services_by_name["Node"]
COORDINATOR_SERVICES = (*SERVICE_NAMES, HEALTH.full_name, *REFLECTION_SERVICES)
NODE_SERVICES = (NODE.full_name, HEALTH.full_name, *REFLECTION_SERVICES)
FILES: tuple[FileDescriptor, ...] = tuple(
    m.DESCRIPTOR
    for m in (
        admin_pb2,
        gateway_pb2,
        locks_pb2,
        node_pb2,
        task_pb2,
        tasks_pb2,
        health_pb2,
        reflection_pb2,
    )
)

ROUNDS_PER_RUN = 60
"""Hypothesis examples per run; each example (a round) sends one call to every method.

Runs are short and each has its own seed: Hypothesis's memory grows with the examples of a
run and is reused by the next, so after the warm-up run, RSS growth is the servers' own.
"""
WARMUP_RUNS = 1
RUNS = 3
MIN_MESSAGES = 10_000
MAX_RSS_GROWTH = 200 << 20

DEADLINE = 10.0
"""Client deadline of a call that should answer at once."""
BLOCKING_DEADLINE = 1.5
"""Client deadline of a call that may rightly block: Wait, and every stream."""
READS = 6
READ_WAIT = 0.25
"""A stream is read until it ends, READS responses, or READ_WAIT seconds without one."""
MAX_INFLIGHT = 48

CLEAN = frozenset(
    c.name
    for c in (
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.OUT_OF_RANGE,
    )
)
BLOCKED = frozenset({grpc.StatusCode.DEADLINE_EXCEEDED.name, grpc.StatusCode.CANCELLED.name})
OPEN = "OPEN"
"""Outcome of a stream still open, with no error, when the fuzzer hung up."""
HANG = "HANG"
"""Outcome of a call that got no answer at all, even well past its own deadline."""
ENDED_WHILE_WRITING = "ENDED_WHILE_WRITING"
"""Outcome of a client stream the server ended while the fuzzer was still writing to it.

grpc.aio then reports its own INTERNAL ("Internal error from Core", the failed send) in
place of the server's status, so the status is unknown; a handler that failed with an
unhandled exception is still caught, by the check that nothing was logged at ERROR.
"""
_CLIENT_SEND_FAILED = "Internal error from Core"


def weighted(*options: tuple[int, SearchStrategy[_T]]) -> SearchStrategy[_T]:
    """One of `options`, picked in proportion to its weight."""
    total = sum(weight for weight, _ in options)

    def pick(n: int) -> SearchStrategy[_T]:
        for weight, strategy in options:
            if n < weight:
                return strategy
            n -= weight
        raise AssertionError(n)

    return st.integers(0, total - 1).flatmap(pick)


# -- what the servers handed out -----------------------------------------------------------

_KNOWN_MAX = 256
_KNOWN_LONGEST = 256


class KnownValues:
    """Strings the servers answered with, by field name, so requests can name real things.

    A field draws from the values seen in fields of the same kind (`task_ids`, `task_id` and
    `id` are all ids; `executors` and `executor` alike), else from all of them.
    """

    def __init__(self, never: Sequence[str]) -> None:
        self._by_kind: dict[str, dict[str, None]] = {}  # insertion-ordered sets
        self._all: dict[str, None] = {}
        self._never = frozenset(never)

    @staticmethod
    def kind(field_name: str) -> str:
        return field_name.rsplit("_", 1)[-1].removesuffix("s")

    def pick(self, field_name: str, n: int) -> str:
        values = list(self._by_kind.get(self.kind(field_name)) or self._all)
        return values[n % len(values)] if values else ""

    def harvest(self, message: Message) -> None:
        """Remember the strings of a response (never one in `never`)."""
        for fd, value in message.ListFields():
            if fd.message_type is not None:
                if not fd.message_type.GetOptions().map_entry:
                    for sub in value if fd.is_repeated else (value,):
                        self.harvest(sub)
            elif fd.type == _F.TYPE_STRING:
                for item in value if fd.is_repeated else (value,):
                    self._add(self.kind(fd.name), item)

    def _add(self, kind: str, value: str) -> None:
        if not value or len(value) > _KNOWN_LONGEST or value in self._never:
            return
        for pool in (self._by_kind.setdefault(kind, {}), self._all):
            pool.pop(value, None)
            pool[value] = None  # the most recent last
            if len(pool) > _KNOWN_MAX:
                del pool[next(iter(pool))]


# -- messages from descriptors -------------------------------------------------------------

_I32 = (-(2**31), 2**31 - 1)
_U32 = (0, 2**32 - 1)
_I64 = (-(2**63), 2**63 - 1)
_U64 = (0, 2**64 - 1)
_INT_RANGES = {
    _F.TYPE_INT32: _I32,
    _F.TYPE_SINT32: _I32,
    _F.TYPE_SFIXED32: _I32,
    _F.TYPE_UINT32: _U32,
    _F.TYPE_FIXED32: _U32,
    _F.TYPE_INT64: _I64,
    _F.TYPE_SINT64: _I64,
    _F.TYPE_SFIXED64: _I64,
    _F.TYPE_UINT64: _U64,
    _F.TYPE_FIXED64: _U64,
}
_EDGE_INTS = tuple(
    sorted({s * (2**b + d) for b in range(65) for d in (-1, 0, 1) for s in (1, -1)} | {0})
)
"""Integers at the edges of every width, where conversions overflow: ±2**n and either side."""
_MAX_DURATION_S = 315_576_000_000  # the range google.protobuf.Duration documents
_MIN_TIMESTAMP_S, _MAX_TIMESTAMP_S = -62_135_596_800, 253_402_300_799  # 0001-01-01 .. 9999-12-31
_DENSITIES = ((9, 1), (3, 1), (1, 1))
"""Odds (set, unset) of each field: a message is dense, mostly filled, or half filled."""
_IDENT = string.ascii_letters + string.digits + "_-."
_EDGE_TEXT = (
    "",
    " ",
    "0",
    "-1",
    "1e309",
    "nan",
    "\x00",
    "a\x00b",
    "x" * 129,
    "x" * 257,
    "é" * 200,
    "🙂" * 100,
    "\u202e\ufeff",
    "../../../etc/passwd",
    "%s%n%x",
    "' OR 1=1 --",
    "shoal_",
    "shoal__",
    "shoal_0_0",
    "Bearer x",
    "*",
)


def _words(files: Sequence[FileDescriptor]) -> tuple[str, ...]:
    """Names the servers know: files, packages, services, methods and messages."""
    out: set[str] = set()
    for file in files:
        out |= {file.name, file.package}
        for service in file.services_by_name.values():
            out.add(service.full_name)
            out |= {f"{service.full_name}.{m.name}" for m in service.methods}
            out |= {f"/{service.full_name}/{m.name}" for m in service.methods}
        out |= {m.full_name for m in file.message_types_by_name.values()}
    return tuple(sorted(out))


def _assign(message: Message, fd: FieldDescriptor, value: Any) -> None:
    """Set a field to a drawn value; a value the runtime refuses is left out."""
    try:
        target = getattr(message, fd.name)
        if isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, Message):
                    target[key].CopyFrom(item)
                else:
                    target[key] = item
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, Message):
                    target.add().CopyFrom(item)
                else:
                    target.append(item)
        elif isinstance(value, Message):
            target.CopyFrom(value)
        else:
            setattr(message, fd.name, value)
    except (ValueError, TypeError, OverflowError):
        pass  # e.g. an unknown number of a closed enum


def _duration(nanos: int) -> Message:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(nanos)
    return duration


def _timestamp(nanos: int) -> Message:
    timestamp = timestamp_pb2.Timestamp()
    timestamp.FromNanoseconds(nanos)
    return timestamp


def _beyond(cls: type[Message], lo: int, hi: int) -> SearchStrategy[Message]:
    """Durations or Timestamps (`cls`) with seconds outside [lo, hi], the range they document."""
    seconds = [s for s in _EDGE_INTS if not lo <= s <= hi and _I64[0] <= s <= _I64[1]]
    return st.builds(cls, seconds=st.sampled_from(seconds), nanos=st.integers(*_I32))


def _serialized(message: Message) -> bytes:
    try:
        return message.SerializeToString()
    except (EncodeError, ValueError):
        return b""  # a value the runtime will not encode


class MessageStrategies:
    """Hypothesis strategies for any protobuf message, derived from its descriptor alone.

    Wild messages: integers anywhere in their range and at the edges of every width, floats
    with nan and inf, strings with NUL, any unicode, numbers and a few KB, enums with unknown
    numbers, at most one member of a oneof, Duration/Timestamp in and out of their range.
    Plausible messages (`plausible=True`) look like a client's: short names, small positive
    numbers, known enum values, a member of every oneof, durations of a few seconds; they get
    past validation to the code behind it. Strings of both kinds are often ones the servers
    handed out. Nesting stops at `max_depth`.
    """

    def __init__(self, known: KnownValues, words: Sequence[str], *, max_depth: int = 4) -> None:
        self._known = known
        self._max_depth = max_depth
        self._messages: dict[tuple[str, int, bool], SearchStrategy[Message]] = {}
        self._texts: dict[tuple[str, bool], SearchStrategy[str]] = {}
        self._named = st.sampled_from(_EDGE_TEXT + tuple(words))
        self._ident = st.text(_IDENT, min_size=1, max_size=16)
        self._numeric = weighted(
            (1, st.sampled_from(_EDGE_INTS)),
            (1, st.integers(2**63, 2**100).flatmap(lambda n: st.sampled_from((n, -n)))),
            (1, st.integers(-(2**80), 2**80)),
        ).map(str)
        self._long_text = st.tuples(st.text(min_size=1, max_size=4), st.integers(64, 1200)).map(
            lambda p: p[0] * p[1]
        )
        long_bytes = st.tuples(st.binary(min_size=1, max_size=4), st.integers(64, 1200)).map(
            lambda p: p[0] * p[1]
        )
        self._binary = {
            False: weighted((8, st.binary(max_size=32)), (1, long_bytes)),
            True: st.binary(max_size=16),
        }
        # Map keys never come from the servers' answers: a key equal to another is drawn
        # again, and Hypothesis needs the same choices to give the same draws.
        self._keys = {
            False: weighted((8, st.text(max_size=24)), (4, self._ident), (3, self._named)),
            True: self._ident,
        }

    def messages(
        self, descriptor: Descriptor, depth: int | None = None, *, plausible: bool = False
    ) -> SearchStrategy[Message]:
        depth = self._max_depth if depth is None else depth
        key = (descriptor.full_name, depth, plausible)
        if key not in self._messages:
            self._messages[key] = self._build(descriptor, depth, plausible)
        return self._messages[key]

    def payloads(self, descriptor: Descriptor, *, opening: bool = False) -> SearchStrategy[bytes]:
        """Serialized messages, plausible or wild, often mutated; now and then random bytes.

        `opening`: the first message of a client stream, which usually sets a oneof member.
        """
        wild = self._openings(descriptor) if opening else self.messages(descriptor)
        valid = weighted(
            (1, self.messages(descriptor, plausible=True).map(_serialized)),
            (1, wild.map(_serialized)),
        )
        mutated = st.tuples(valid, st.lists(MUTATIONS, min_size=1, max_size=4)).map(
            lambda p: mutate(*p)
        )
        return weighted((10, valid), (6, mutated), (1, st.binary(max_size=64)))

    def _build(
        self, descriptor: Descriptor, depth: int, plausible: bool
    ) -> SearchStrategy[Message]:
        cls = message_factory.GetMessageClass(descriptor)
        if depth <= 0:
            return st.builds(cls)
        if descriptor is duration_pb2.Duration.DESCRIPTOR and plausible:
            return st.integers(1, 3 * 10**9).map(_duration)
        if descriptor is timestamp_pb2.Timestamp.DESCRIPTOR and plausible:
            return st.integers(1_600_000_000 * 10**9, 2_000_000_000 * 10**9).map(_timestamp)
        groups = [o for o in descriptor.oneofs if len(o.fields) > 1]  # not proto3 `optional`
        grouped = {f.name for o in groups for f in o.fields}
        plain = [f for f in descriptor.fields if f.name not in grouped]
        fields = descriptor.fields_by_name

        def pair(fd: FieldDescriptor) -> SearchStrategy[tuple[str, Any]]:
            return st.tuples(st.just(fd.name), self._field(fd, depth, plausible))

        choices = []
        for group in groups:
            member = st.one_of(*(pair(f) for f in group.fields))
            choices.append(member if plausible else weighted((4, member), (1, st.none())))

        def build(drawn: tuple[tuple[tuple[str, Any] | None, ...], ...]) -> Message:
            message = cls()
            for name, value in (p for part in drawn for p in part if p is not None):
                _assign(message, fields[name], value)
            return message

        generic = st.one_of(
            *(
                st.tuples(
                    st.tuples(*(weighted((on, pair(f)), (off, st.none())) for f in plain)),
                    st.tuples(*choices),
                ).map(build)
                for on, off in _DENSITIES
            )
        )
        if plausible:
            return generic
        if descriptor is duration_pb2.Duration.DESCRIPTOR:
            bound = _MAX_DURATION_S * 10**9
            return weighted(
                (2, _beyond(cls, -_MAX_DURATION_S, _MAX_DURATION_S)),
                (2, st.integers(-(10**10), 10**10).map(_duration)),
                (1, st.integers(-bound, bound).map(_duration)),
                (1, generic),
            )
        if descriptor is timestamp_pb2.Timestamp.DESCRIPTOR:
            lo, hi = _MIN_TIMESTAMP_S * 10**9, _MAX_TIMESTAMP_S * 10**9
            return weighted(
                (2, _beyond(cls, _MIN_TIMESTAMP_S, _MAX_TIMESTAMP_S)),
                (2, st.integers(lo, hi).map(_timestamp)),
                (1, generic),
            )
        return weighted((12, generic), (1, st.builds(cls)))

    def _field(self, fd: FieldDescriptor, depth: int, plausible: bool) -> SearchStrategy[Any]:
        entry = fd.message_type
        if entry is not None and entry.GetOptions().map_entry:
            key_fd = entry.fields_by_name["key"]
            if key_fd.type == _F.TYPE_STRING:
                key = self._keys[plausible]
            else:
                key = self._single(key_fd, depth, plausible)
            value = self._single(entry.fields_by_name["value"], depth, plausible)
            return weighted(
                (2, st.dictionaries(key, value, min_size=1, max_size=3)), (1, st.just({}))
            )
        one = self._single(fd, depth, plausible)
        if not fd.is_repeated:
            return one
        return weighted((2, st.lists(one, min_size=1, max_size=3)), (1, st.just([])))

    def _single(self, fd: FieldDescriptor, depth: int, plausible: bool) -> SearchStrategy[Any]:
        if fd.message_type is not None:
            return self.messages(fd.message_type, depth - 1, plausible=plausible)
        if fd.enum_type is not None:
            numbers = [v.number for v in fd.enum_type.values]
            if plausible:
                return st.sampled_from([n for n in numbers if n] or numbers)
            return weighted((4, st.sampled_from(numbers)), (1, st.integers(*_I32)))
        if fd.type == _F.TYPE_STRING:
            return self._text(fd.name, plausible)
        if fd.type == _F.TYPE_BYTES:
            return self._binary[plausible]
        if fd.type == _F.TYPE_BOOL:
            return st.booleans()
        if fd.type == _F.TYPE_FLOAT:
            return st.floats(0, 100, width=32) if plausible else st.floats(width=32)
        if fd.type == _F.TYPE_DOUBLE:
            return st.floats(0, 100) if plausible else st.floats()
        if plausible:
            return st.integers(1, 100)
        lo, hi = _INT_RANGES[fd.type]
        edges = [v for v in _EDGE_INTS if lo <= v <= hi]
        return weighted((3, st.integers(lo, hi)), (2, st.sampled_from(edges)))

    def _text(self, field_name: str, plausible: bool) -> SearchStrategy[str]:
        key = (KnownValues.kind(field_name), plausible)
        if key not in self._texts:
            issued = st.integers(0, 2**16).map(lambda n: self._known.pick(field_name, n))
            if plausible:
                self._texts[key] = weighted((5, self._ident), (4, issued), (1, self._named))
            else:
                self._texts[key] = weighted(
                    (8, st.text(max_size=24)),  # any unicode but surrogates, NUL included
                    (4, self._ident),
                    (3, self._named),
                    (3, issued),
                    (4, self._numeric),
                    (1, self._long_text),
                )
        return self._texts[key]

    def _openings(self, descriptor: Descriptor) -> SearchStrategy[Message]:
        """Wild messages with exactly one member of a oneof set."""
        groups = [o for o in descriptor.oneofs if len(o.fields) > 1]
        members = [f for o in groups for f in o.fields]
        if not members:
            return self.messages(descriptor)

        def only(drawn: tuple[Message, FieldDescriptor, Any]) -> Message:
            message, fd, value = drawn
            for group in groups:
                if fd in group.fields:
                    message.ClearField(group.name)
            _assign(message, fd, value)
            return message

        return st.sampled_from(members).flatmap(
            lambda fd: st.tuples(
                self.messages(descriptor), st.just(fd), self._single(fd, self._max_depth, False)
            ).map(only)
        )


# -- mutation of the wire bytes ------------------------------------------------------------


@dataclass(frozen=True)
class Mutation:
    kind: str
    at: int
    arg: int
    blob: bytes


_FIELD_MUTATIONS = ("duplicate", "repeat", "swap", "drop")
MUTATIONS = st.builds(
    Mutation,
    kind=st.sampled_from(
        (
            "flip",
            "set",
            "truncate",
            "insert",
            "delete",
            *_FIELD_MUTATIONS,
            "huge_length",
            "bad_wire_type",
            "long_varint",
            "nest",
        )
    ),
    at=st.integers(0, 2**16),
    arg=st.integers(0, 255),
    blob=st.binary(min_size=1, max_size=12),
)
_MAX_MUTATED = 256 << 10


def _varint(data: bytes, i: int) -> tuple[int, int] | None:
    value = shift = 0
    while i < len(data) and shift < 70:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i
    return None


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def wire_fields(data: bytes) -> list[bytes] | None:
    """The top-level fields of a serialized message, tags included; None if malformed."""
    out: list[bytes] = []
    i = 0
    while i < len(data):
        start = i
        tag = _varint(data, i)
        if tag is None:
            return None
        wire, i = tag[0] & 7, tag[1]
        if wire == 0:
            value = _varint(data, i)
            if value is None:
                return None
            i = value[1]
        elif wire == 2:
            length = _varint(data, i)
            if length is None:
                return None
            i = length[1] + length[0]
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            return None
        if i > len(data):
            return None
        out.append(data[start:i])
    return out


def _mutate_once(data: bytes, m: Mutation) -> bytes:
    n = len(data)
    p = m.at % (n + 1)
    tag = (1 + m.arg % 15) << 3
    fields = wire_fields(data) if m.kind in _FIELD_MUTATIONS else None
    if fields:
        i, j = m.at % len(fields), m.arg % len(fields)
        if m.kind == "duplicate":
            fields.insert(j, fields[i])
        elif m.kind == "repeat":  # many copies: a repeated field past its limits
            fields[i:i] = [fields[i]] * min(1 + m.arg * 8, _MAX_MUTATED // len(fields[i]))
        elif m.kind == "swap":
            fields[i], fields[j] = fields[j], fields[i]
        else:
            del fields[i]
        return b"".join(fields)
    if m.kind in ("flip", "set") and n:
        out = bytearray(data)
        out[m.at % n] = out[m.at % n] ^ (1 << m.arg % 8) if m.kind == "flip" else m.arg
        return bytes(out)
    if m.kind == "truncate":
        return data[:p]
    if m.kind in ("delete", "drop"):
        return data[:p] + data[p + 1 + m.arg % 16 :]
    if m.kind == "huge_length":  # a length-delimited field claiming ~4 GB
        return data[:p] + bytes([tag | 2]) + b"\xff\xff\xff\xff\x0f" + data[p:]
    if m.kind == "bad_wire_type":  # groups (3, 4) and the undefined wire types 6 and 7
        return data[:p] + bytes([tag | (3, 4, 6, 7)[m.arg % 4]]) + m.blob + data[p:]
    if m.kind == "long_varint":
        return data[:p] + b"\xff" * (10 + m.arg % 4) + b"\x01" + data[p:]
    if m.kind == "nest":  # the message wrapped in a field of itself, again and again
        for _ in range(1 + m.at % 120):
            data = bytes([tag | 2]) + _encode_varint(len(data)) + data
        return data
    return data[:p] + m.blob + data[p:]  # insert, and the field mutations of malformed data


def mutate(data: bytes, mutations: Sequence[Mutation]) -> bytes:
    for m in mutations:
        data = _mutate_once(data, m)
    return data[:_MAX_MUTATED]


# -- calls ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    server: str  # "coordinator" or "node"
    method: MethodDescriptor

    @property
    def path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def streaming(self) -> bool:
        return self.method.client_streaming or self.method.server_streaming

    @property
    def may_block(self) -> bool:
        """Streams, and calls that wait for a timeout of their own, may run to the deadline."""
        return self.streaming or "timeout" in self.method.input_type.fields_by_name

    def allowed(self) -> frozenset[str]:
        streams = frozenset({OPEN, ENDED_WHILE_WRITING} if self.streaming else ())
        return CLEAN | (BLOCKED if self.may_block else frozenset()) | streams


@dataclass(frozen=True)
class Call:
    target: Target
    requests: tuple[bytes, ...]
    metadata: _Metadata
    half_close: bool


@dataclass(frozen=True)
class Answer:
    call: Call
    outcome: str  # a status code name, OPEN, HANG or ENDED_WHILE_WRITING
    details: str
    sent: int
    reply: bytes = b""


def targets(services: Sequence[str], server: str) -> list[Target]:
    pool = descriptor_pool.Default()
    return [
        Target(server, method)
        for name in services
        for method in pool.FindServiceByName(name).methods
    ]


def _header_safe(value: str | None, fallback: str) -> str:
    """`value` if grpc can send it as a header value (visible ASCII), else `fallback`."""
    ok = value and value.isascii() and value.isprintable() and " " not in value
    return value if ok and value is not None else fallback


def credentials(token: str, known: KnownValues) -> SearchStrategy[_Metadata]:
    """Mostly the admin token; sometimes tokens the fuzzer created, none, or garbage."""
    token_id, _ = parse_token(token)
    garbage = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=60)

    def bearer(value: str) -> _Metadata:
        return (("authorization", f"Bearer {value}"),)

    return weighted(
        (30, st.just(bearer(token))),
        (
            4,
            st.integers(0, 2**16).map(
                lambda n: bearer(_header_safe(known.pick("token", n), token))
            ),
        ),
        (2, st.just(())),
        (1, garbage.map(bearer)),
        (1, garbage.map(lambda v: (("authorization", v),))),
        (1, garbage.map(lambda v: bearer(f"shoal_{token_id}_{v}"))),  # the admin's id
    )


def plans(
    target: Target, gen: MessageStrategies, auth: SearchStrategy[_Metadata]
) -> SearchStrategy[Call]:
    """Calls of `target`: one request, or for a client stream an opening and a few more."""
    request = target.method.input_type
    one = gen.payloads(request)
    if target.method.client_streaming:
        first = gen.payloads(request, opening=True)
        requests = st.tuples(first, st.lists(one, max_size=4)).map(lambda p: (p[0], *p[1]))
    else:
        requests = one.map(lambda b: (b,))
    return st.builds(
        Call, target=st.just(target), requests=requests, metadata=auth, half_close=st.booleans()
    )


async def exchange(channel: Any, call: Call) -> Answer:
    """Make one call with raw request bytes; how it ended."""
    method, path = call.target.method, call.target.path
    timeout = BLOCKING_DEADLINE if call.target.may_block else DEADLINE
    stream: Any = None
    sent = 0
    try:
        async with asyncio.timeout(timeout + 10):
            if not call.target.streaming:
                sent = 1
                reply = await channel.unary_unary(path)(
                    call.requests[0], metadata=call.metadata, timeout=timeout
                )
                return Answer(call, grpc.StatusCode.OK.name, "", sent, reply)
            if method.client_streaming:
                factory = channel.stream_stream if method.server_streaming else channel.stream_unary
                stream = factory(path)(metadata=call.metadata, timeout=timeout)
                for request in call.requests:
                    if stream.done():
                        break
                    try:
                        await stream.write(request)
                    except grpc.aio.AioRpcError as err:
                        if err.details() != _CLIENT_SEND_FAILED:
                            raise
                        return Answer(call, ENDED_WHILE_WRITING, "", sent)
                    sent += 1
                if call.half_close or not method.server_streaming:
                    try:
                        await stream.done_writing()
                    except cygrpc.ExecuteBatchError:  # grpc.aio lets this one out as it is
                        # The server had ended the call: Core refused the half-close.
                        code = await stream.code()
                        return Answer(call, code.name, await stream.details() or "", sent)
                if not method.server_streaming:
                    await stream
                    return Answer(call, grpc.StatusCode.OK.name, "", sent)
            else:
                stream = channel.unary_stream(path)(
                    call.requests[0], metadata=call.metadata, timeout=timeout
                )
                sent = 1
            for _ in range(READS):
                try:
                    got = await asyncio.wait_for(stream.read(), READ_WAIT)
                except TimeoutError:
                    return Answer(call, OPEN, "", sent)
                if got is grpc.aio.EOF:
                    code = await stream.code()
                    return Answer(call, code.name, await stream.details() or "", sent)
            return Answer(call, OPEN, "", sent)
    except grpc.aio.AioRpcError as err:
        return Answer(call, err.code().name, err.details() or "", sent)
    except asyncio.InvalidStateError:  # a write after the server had ended the call
        code = await stream.code()
        return Answer(call, code.name, await stream.details() or "", sent)
    except TimeoutError:
        return Answer(call, HANG, f"no answer {timeout + 10:.0f} s after the call", sent)
    finally:
        if stream is not None:
            stream.cancel()


# -- sending and counting ------------------------------------------------------------------


@dataclass
class Tally:
    """What the fuzzer sent and got, per method; the smallest calls of each bad outcome."""

    messages: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    bad: dict[tuple[str, str], list[Answer]] = field(default_factory=dict)

    def add(self, answer: Answer) -> None:
        path = answer.call.target.path
        self.messages[path] += answer.sent
        self.outcomes[path, answer.outcome] += 1
        if answer.outcome not in answer.call.target.allowed():
            same = self.bad.setdefault((path, answer.outcome), [])
            same.append(answer)
            same.sort(key=lambda a: sum(len(r) for r in a.call.requests))
            del same[3:]

    @property
    def total(self) -> int:
        return sum(self.messages.values())


class Fuzzer:
    """Sends calls to the servers' loop, at most MAX_INFLIGHT at a time, and tallies answers."""

    def __init__(self, servers: Servers, known: KnownValues) -> None:
        self._servers = servers
        self._known = known
        self._channels: dict[str, Any] = servers.loop.run(self._open())
        self._pending: set[concurrent.futures.Future[Answer]] = set()
        self.tally = Tally()

    async def _open(self) -> dict[str, Any]:
        return {
            "coordinator": grpc.aio.insecure_channel(self._servers.coordinator.address),
            "node": grpc.aio.insecure_channel(self._servers.node_address),
        }

    def send(self, call: Call) -> None:
        channel = self._channels[call.target.server]
        self._pending.add(self._servers.loop.submit(exchange(channel, call)))
        if len(self._pending) >= MAX_INFLIGHT:
            done, self._pending = concurrent.futures.wait(
                self._pending, return_when=concurrent.futures.FIRST_COMPLETED
            )
            self._record(done)

    def drain(self) -> None:
        done, self._pending = concurrent.futures.wait(self._pending, timeout=DEADLINE + 30)
        self._record(done)
        assert not self._pending, f"{len(self._pending)} calls unanswered past their deadlines"

    def _record(self, done: set[concurrent.futures.Future[Answer]]) -> None:
        for future in done:
            answer = future.result()
            self.tally.add(answer)
            if answer.reply:
                reply = message_factory.GetMessageClass(answer.call.target.method.output_type)
                self._known.harvest(reply.FromString(answer.reply))

    def close(self) -> None:
        self._servers.loop.run(self._close())

    async def _close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


def fuzz_run(fuzzer: Fuzzer, call_plans: Sequence[SearchStrategy[Call]], *, seed: int) -> None:
    """One Hypothesis run of ROUNDS_PER_RUN rounds, each one call of every plan; seeded."""

    @hypothesis.seed(seed)
    @settings(
        max_examples=ROUNDS_PER_RUN,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
    )
    @given(st.data())
    def one_round(data: st.DataObject) -> None:
        for plan in call_plans:
            fuzzer.send(data.draw(plan))

    one_round()
    fuzzer.drain()


def _rss_after_gc() -> int:
    gc.collect()
    return int(psutil.Process().memory_info().rss)


# -- checks after the run ------------------------------------------------------------------


async def _health(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=DEADLINE
        )
        return int(reply.status)


async def _real_task(address: str, token: str) -> str:
    """Submit a noop task and wait for it; what went wrong, if anything."""
    async with AsyncClient(address, token=token) as client:
        task = await client.submit(noop({"after": "fuzzing"}))
        try:
            done = await asyncio.wait_for(client.wait(task.id), DEADLINE)
        except TimeoutError:
            task = await client.get(task.id)
            return f"a real task did not finish: {text_format.MessageToString(task)}"
        got = await client.get(task.id)
        if done.state != task_pb2.TASK_STATE_SUCCEEDED or got.state != done.state:
            return f"a real task ended {done.state}, then read back as {got.state}"
        return ""


async def _reflected(address: str, token: str) -> set[str]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = channel.stream_stream(
            f"/{REFLECTION.full_name}/{REFLECTION.methods_by_name['ServerReflectionInfo'].name}",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        call = stub(metadata=(("authorization", f"Bearer {token}"),), timeout=DEADLINE)
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        response = await call.read()
        call.cancel()
        return {s.name for s in response.list_services_response.service}


async def _sessions_settle(servers: Servers) -> list[str]:
    """The node sessions the coordinator holds once the fuzzer's have ended."""
    deadline = time.monotonic() + DEADLINE
    while True:
        nodes = sorted(n.info.node_id for n in servers.coordinator.core.nodes())
        if nodes == [servers.node.node_id] or time.monotonic() > deadline:
            return nodes
        await asyncio.sleep(0.05)


async def _resend(servers: Servers, call: Call) -> str:
    server = servers.coordinator.address if call.target.server == "coordinator" else None
    async with grpc.aio.insecure_channel(server or servers.node_address) as channel:
        return (await exchange(channel, call)).outcome


def _decoded(target: Target, request: bytes) -> str:
    try:
        message = message_factory.GetMessageClass(target.method.input_type).FromString(request)
    except DecodeError:
        return "(malformed)"
    return text_format.MessageToString(message, as_one_line=True)[:300]


def _bad_answers(servers: Servers, tally: Tally) -> list[str]:
    """One line per method and bad outcome: its smallest call, sent again to check it."""
    lines = []
    for (path, outcome), answers in sorted(tally.bad.items()):
        call = answers[0].call
        again = servers.loop.run(_resend(servers, call), DEADLINE + 20)
        lines.append(
            f"{path}: {outcome} x{tally.outcomes[path, outcome]} ({answers[0].details!r});"
            f" sent again: {again}; token: {'yes' if call.metadata else 'no'};"
            f" requests (hex): {[r.hex() for r in call.requests]};"
            f" decoded: {[_decoded(call.target, r) for r in call.requests]}"
        )
    return lines


def _grpc_poller_noise(r: logging.LogRecord) -> bool:
    """gRPC's asyncio poller wakes every loop that ever used gRPC in this process (the
    servers' thread and the tests' own): a call of a loop that has since closed is then
    handed to a closed loop, or a loop finds the wake-up byte taken by another (grpc/grpc
    issue 25364). Only tests run loops in several threads; no Shoal process does."""
    error = r.exc_info[1] if r.exc_info else None
    return (
        r.name == "asyncio"
        and "PollerCompletionQueue._handle_events" in r.getMessage()
        and (
            isinstance(error, BlockingIOError)
            or (isinstance(error, RuntimeError) and str(error) == "Event loop is closed")
        )
    )


def _errors_logged(records: Sequence[logging.LogRecord]) -> list[str]:
    """Each distinct ERROR line, with how often it was logged and its first traceback."""
    seen: dict[tuple[str, str], list[logging.LogRecord]] = {}
    for r in records:
        if r.levelno >= logging.ERROR and not _grpc_poller_noise(r):
            seen.setdefault((r.name, r.getMessage()), []).append(r)
    form = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return [f"logged x{len(same)}: {form.format(same[0])[:3000]}" for same in seen.values()]


async def _undrain(servers: Servers) -> None:
    core = servers.coordinator.core
    if any(n.draining for n in core.nodes()):
        core.undrain(servers.node.node_id)
    async with asyncio.timeout(DEADLINE):
        while servers.node.draining:  # noqa: ASYNC110  (until the node has heard of it)
            await asyncio.sleep(0.01)


# -- the test ------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_every_rpc_survives_generated_and_mutated_messages(
    servers: Servers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)  # WARNING lines, one per refused call, are not kept
    started = time.monotonic()
    loop = servers.loop
    reflected = loop.run(_reflected(servers.coordinator.address, servers.token))
    assert reflected == set(COORDINATOR_SERVICES)  # every service it serves gets fuzzed
    every = targets(COORDINATOR_SERVICES, "coordinator") + targets(NODE_SERVICES, "node")

    admin_id, admin_secret = parse_token(servers.token)
    admin = [r.name for r in servers.coordinator.core.tokens.active() if r.id == admin_id]
    # The admin token is never named in a request: a fuzzed RevokeToken must not revoke it.
    known = KnownValues(never=[admin_id, admin_secret, servers.token, *admin])
    gen = MessageStrategies(known, _words(FILES))
    auth = credentials(servers.token, known)
    call_plans = [plans(t, gen, auth) for t in every]
    fuzzer = Fuzzer(servers, known)
    try:
        for run in range(WARMUP_RUNS):
            fuzz_run(fuzzer, call_plans, seed=run)
        rss = [_rss_after_gc()]
        for run in range(WARMUP_RUNS, WARMUP_RUNS + RUNS):
            fuzz_run(fuzzer, call_plans, seed=run)
            rss.append(_rss_after_gc())
    finally:
        fuzzer.close()
    tally = fuzzer.tally

    print(f"\nfuzzed {tally.total} messages in {time.monotonic() - started:.1f} s")
    for t in every:
        outcomes = {o: n for (p, o), n in sorted(tally.outcomes.items()) if p == t.path}
        print(f"  {t.server:11} {t.path:62} {tally.messages[t.path]:5}  {outcomes}")
    growth = rss[-1] - rss[0]
    print(
        f"RSS after the warm-up {rss[0] / 2**20:.1f} MiB, at the end {rss[-1] / 2**20:.1f} MiB,"
        f" growth {growth / 2**20:+.1f} MiB; after each run: {[r >> 20 for r in rss]} MiB"
    )

    assert tally.total >= MIN_MESSAGES
    assert min(tally.messages[t.path] for t in every) >= ROUNDS_PER_RUN * RUNS, tally.messages
    problems = _bad_answers(servers, tally)
    # A fuzzed Drain may have drained the node: undrained, it must be whole again.
    loop.run(_undrain(servers))
    serving = health_pb2.HealthCheckResponse.SERVING
    for name, address in [
        ("coordinator", servers.coordinator.address),
        ("node", servers.node_address),
    ]:
        if (status := loop.run(_health(address))) != serving:
            problems.append(f"{name} health is {status} after the run, not SERVING")
    if (nodes := loop.run(_sessions_settle(servers))) != [servers.node.node_id]:
        problems.append(f"node sessions left after the run: {nodes}")
    if failed := loop.run(_real_task(servers.coordinator.address, servers.token), 2 * DEADLINE):
        problems.append(failed)
    problems += _errors_logged(caplog.records)
    if growth >= MAX_RSS_GROWTH:
        problems.append(f"RSS grew by {growth >> 20} MiB")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


# -- large shapes: output and batches by the megabyte ---------------------------------------


@dataclass(frozen=True)
class Flood:
    """A task printing `size` bytes to `stream` in lines of `width` (0: one line)."""

    size: int
    width: int
    stream: str

    def spec(self) -> task_pb2.TaskSpec:
        fold = f" | fold -w {self.width}" if self.width else ""
        to = " >&2" if self.stream == "stderr" else ""
        return shell(
            f"head -c {self.size} /dev/zero | tr '\\0' x{fold}{to}; echo end", labels=_SHAPES
        )


_SHAPES = {"shapes": "large"}
FLOODS = st.builds(
    Flood,
    size=st.integers(0, 20 << 20),
    width=st.sampled_from((0, 1, 80, 4096, 100_000)),
    stream=st.sampled_from(("stdout", "stderr")),
)
# Batches of specs up to 900 kB each, as many as fit one request: dispatched to a node together.
BATCHES = st.lists(st.integers(1, 900_000), min_size=1, max_size=16).filter(
    lambda sizes: sum(sizes) < 14 << 20
)


def _weighing(size: int) -> task_pb2.TaskSpec:
    """A task whose spec weighs about `size` bytes (in arguments under the kernel's limit)."""
    pieces = [*["w" * 100_000] * (size // 100_000), "w" * (size % 100_000)]
    return shell(["sh", "-c", "exit 0", *pieces], labels=_SHAPES)


async def _large_shapes(
    client: AsyncClient, floods: Sequence[Flood], batches: Sequence[Sequence[int]]
) -> list[str]:
    """Submit every shape at once; what did not end well."""
    ids = [(await client.submit(f.spec())).id for f in floods]
    for sizes in batches:
        ids += await client.submit_batch([_weighing(n) for n in sizes])
    done = await asyncio.gather(*(client.wait(i) for i in ids))
    return [
        f"{t.id}: {task_pb2.TaskState.Name(t.state)} {t.result.error!r}"
        for t in done
        if t.state != task_pb2.TASK_STATE_SUCCEEDED
    ]


@pytest.mark.timeout(300)
def test_large_outputs_and_batches_never_end_a_node_session(servers: Servers) -> None:
    """Generated floods of output (any size to 20 MB, any line width, either stream) and
    batches of heavy specs, all at once on a 32-slot node: every task succeeds, and the node
    keeps the session it had."""
    loop = servers.loop

    async def start_node() -> NodeAgent:
        node = NodeAgent(
            NodeSettings(
                coordinator=servers.coordinator.address,
                node_id="shapes-node",
                listen="127.0.0.1:0",
                token_file=servers.coordinator.admin_token_path,
                executors=["shell"],  # runs only the commands written above
                labels=_SHAPES,
                slots=32,
            )
        )
        await node.start()
        await asyncio.wait_for(node.connected.wait(), DEADLINE)
        return node

    async def open_client() -> AsyncClient:
        return AsyncClient(servers.coordinator.address, token=servers.token)

    node = loop.run(start_node())
    client = loop.run(open_client())  # its channel belongs to the servers' loop
    try:

        def session() -> str:
            (status,) = [
                s for s in servers.coordinator.core.nodes() if s.info.node_id == node.node_id
            ]
            return text_format.MessageToString(status.connected_at)

        before = session()

        @hypothesis.seed(16)
        @settings(
            max_examples=4, database=None, deadline=None, phases=[Phase.explicit, Phase.generate]
        )
        @given(st.lists(FLOODS, min_size=1, max_size=3), st.lists(BATCHES, max_size=2))
        @hypothesis.example(  # the largest of each, together
            [Flood(20 << 20, 0, "stdout"), Flood(12 << 20, 80, "stderr")], [[900_000] * 15] * 2
        )
        def shapes(floods: list[Flood], batches: list[list[int]]) -> None:
            failed = loop.run(_large_shapes(client, floods, batches), 240)
            assert not failed, (floods, [len(b) for b in batches], failed)
            assert session() == before  # the node never reconnected

        shapes()
    finally:
        loop.run(client.close())
        loop.run(_bounded_stop(node), DEADLINE + 20)


async def _bounded_stop(node: NodeAgent) -> None:
    await asyncio.wait_for(node.stop(), DEADLINE + 10)


# -- template-heavy specs ------------------------------------------------------------------

_REF = "${{ deps[0].stdout }}"
_PIECES = (
    "${{",
    "}}",
    "${{ ",
    " }}",
    "${{ deps[",
    "].stdout }}",
    "deps[0].output.",
    "a.b-c_d",
    _REF,
    "${{deps[1].exit_code}}",
    "${{ deps[0].output.x }}",
    "${{ deps[99].stderr }}",
    "${{ secrets }}",
    "9" * 12,
    "\n",
    "$(touch /tmp/x)",
    "é🙂",
    "\x00",
)
_MAX_TEMPLATE_SPEC = 900_000
"""Bytes of one generated spec, under the spec size limit: every answer is about templates."""


def _template_texts() -> SearchStrategy[str]:
    """Strings of `${{` pieces, from a few characters to near the spec size limit."""
    motif = st.lists(st.sampled_from(_PIECES), min_size=1, max_size=6).map("".join)
    repeats = weighted((6, st.integers(1, 4)), (2, st.integers(5, 2000)), (1, st.just(10**6)))
    return st.tuples(motif, repeats).map(lambda p: (p[0] * p[1])[: _MAX_TEMPLATE_SPEC // 4])


_INTERPRETERS = ("sh", "/bin/bash", "python3.12", "env", "node", "xargs")
_PLAIN = ("echo", "/usr/bin/printf", "true")


def _template_spec(data: st.DataObject, upstreams: int) -> tuple[task_pb2.TaskSpec, bool]:
    """A spec whose strings are template-heavy, depending on `upstreams` earlier tasks, and
    whether a reference (a whole `${{ … }}`) sits in a field that is code."""
    draw, text = data.draw, _template_texts()
    kind = draw(st.sampled_from(("script", "argv", "python", "docker", "http", "llm", "noop")))
    code: list[str] = []
    env = draw(st.dictionaries(st.sampled_from(("A", "B", "C")), text, max_size=3))
    if kind == "script":
        code.append(draw(text))
        spec = task_pb2.TaskSpec(shell=task_pb2.ShellSpec(script=code[0], env=env))
    elif kind == "argv":
        program = draw(st.sampled_from(_INTERPRETERS + _PLAIN + (_REF,)))
        args = draw(st.lists(text, min_size=1, max_size=4))
        spec = task_pb2.TaskSpec(shell=task_pb2.ShellSpec(argv=[program, *args], env=env))
        code += [program] if program in _PLAIN else [program, *args]
    elif kind == "python":
        code.append(draw(text))
        args = draw(st.lists(text, max_size=3))
        spec = task_pb2.TaskSpec(python=task_pb2.PythonSpec(code=code[0], args=args, env=env))
    elif kind == "docker":
        command = draw(st.lists(text, max_size=3))
        shelled = draw(st.booleans())
        files = draw(st.dictionaries(st.just("/work/in"), text.map(str.encode), max_size=1))
        docker = task_pb2.DockerSpec(
            image="alpine",
            command=(["sh", "-c"] if shelled else []) + command,
            env=env,
            files=files,
        )
        spec = task_pb2.TaskSpec(docker=docker)
        code += command if shelled else command[:1]
    elif kind == "http":
        url, header = draw(text), draw(text)
        spec = task_pb2.TaskSpec(http=task_pb2.HttpSpec(url=url, headers={"h": header}))
    elif kind == "llm":
        messages = [task_pb2.ChatMessage(role="user", content=draw(text))]
        spec = task_pb2.TaskSpec(
            llm=task_pb2.LlmSpec(provider="openai", model="m", prompt=draw(text), messages=messages)
        )
    else:  # runs on the fuzz node: its references are filled at dispatch
        params = {"a": draw(text), "b": {"c": [draw(text), 1]}}
        spec = noop(params)
    spec.depends_on.extend(task_pb2.Dependency(batch_index=i) for i in range(upstreams))
    refers = any((start := t.find("${{")) >= 0 and "}}" in t[start + 3 :] for t in code)
    return spec, refers


@pytest.mark.timeout(300)
def test_template_heavy_specs_are_refused_or_accepted_and_the_coordinator_stays_responsive(
    servers: Servers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    outcomes: Counter[str] = Counter()
    problems: list[str] = []

    async def submit(specs: list[task_pb2.TaskSpec]) -> tuple[str, str, int]:
        """SubmitBatch of `specs` with a health check beside it: the answer's code and
        details, and the health status (-1: no answer)."""
        async with grpc.aio.insecure_channel(servers.coordinator.address) as channel:
            call = tasks_pb2_grpc.TasksStub(channel).SubmitBatch(
                tasks_pb2.SubmitBatchRequest(specs=specs),
                metadata=(("authorization", f"Bearer {servers.token}"),),
                timeout=DEADLINE,
            )
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=DEADLINE
            )
            answers: list[object] = await asyncio.gather(call, health, return_exceptions=True)
        answer, checked = answers
        healthy = checked.status if isinstance(checked, health_pb2.HealthCheckResponse) else -1
        if isinstance(answer, grpc.aio.AioRpcError):
            return answer.code().name, answer.details() or "", healthy
        if isinstance(answer, BaseException):
            raise answer
        return grpc.StatusCode.OK.name, "", healthy

    @hypothesis.seed(16)
    @settings(
        max_examples=80,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.data())
    def one_batch(data: st.DataObject) -> None:
        upstream = noop({"n": 1})
        spec, refers = _template_spec(data, 1)
        specs = [upstream, spec]
        code, details, healthy = servers.loop.run(submit(specs), 2 * DEADLINE)
        outcomes[code] += 1
        allowed = {"INVALID_ARGUMENT"} if refers else {"OK", "INVALID_ARGUMENT"}
        if spec.ByteSize() > 1 << 20:
            allowed.add("RESOURCE_EXHAUSTED")
        if code not in allowed or healthy != health_pb2.HealthCheckResponse.SERVING:
            problems.append(
                f"{code} ({details[:200]!r}), health {healthy}, reference in code: {refers};"
                f" spec: {text_format.MessageToString(spec, as_one_line=True)[:300]}"
            )

    one_batch()
    print(f"\ntemplate-heavy batches: {dict(outcomes)}")
    assert outcomes["OK"] and outcomes["INVALID_ARGUMENT"], outcomes
    if failed := servers.loop.run(_real_task(servers.coordinator.address, servers.token), 30):
        problems.append(failed)
    problems += _errors_logged(caplog.records)
    if problems:
        pytest.fail("\n".join(problems[:20]), pytrace=False)
