"""The SSE stream's shared event encoding, its query parsing and its bounds, without a server."""

from __future__ import annotations

import json

import pytest
from google.protobuf import json_format

from shoal.coordinator.http.limits import StreamSlots
from shoal.coordinator.http.sse import EventJson, watch_request
from shoal.errors import InvalidArgument, ResourceExhausted
from shoal.v1 import task_pb2, tasks_pb2


def _events() -> list[task_pb2.Event]:
    out = []
    for seq in range(1, 40):
        event = task_pb2.Event(seq=(1 << 40) + seq, task_id=f"t{seq}", tenant="acme")
        event.state = task_pb2.TASK_STATE_SUCCEEDED if seq % 2 else task_pb2.TASK_STATE_RUNNING
        event.time.FromNanoseconds(seq * 1_000_000_123)
        if seq % 5 == 0:
            event.output.data = "línea \x00 \u2028\n" * seq
        if seq % 7 == 0:
            event.result.output.update({"n": seq, "text": 'quote " and \\n'})
        out.append(event)
    return out


def test_a_response_encodes_as_protobufs_json_mapping_does() -> None:
    encoded = EventJson(max_bytes=2_000, max_event=300)  # evicts, and skips large events
    events = _events()
    for cut in (0, 1, 10, len(events)):
        response = tasks_pb2.WatchResponse(events=events[:cut], cursor=events[cut - 1].seq)
        assert json.loads(encoded.response(response)) == json_format.MessageToDict(response)
    for response in (tasks_pb2.WatchResponse(), tasks_pb2.WatchResponse(cursor=7)):
        assert json.loads(encoded.response(response)) == json_format.MessageToDict(response)
    assert encoded._bytes <= 2_000


def test_a_query_becomes_a_watch_request() -> None:
    request = watch_request(
        [("task_id", "a,b"), ("taskIds", "c"), ("output", ""), ("states", "succeeded,FAILED")],
        None,
    )
    assert list(request.task_ids) == ["a", "b", "c"] and request.output
    assert list(request.states) == [task_pb2.TASK_STATE_SUCCEEDED, task_pb2.TASK_STATE_FAILED]
    assert not request.HasField("since")
    resumed = watch_request([("cursor", "5")], "9")
    assert resumed.since == 9  # Last-Event-ID over the URL's cursor
    assert watch_request([("since", "0")], None).HasField("since")
    for bad in ([("since", "-1")], [("since", "x")], [("what", "1")], [("output", "2")]):
        with pytest.raises(InvalidArgument):
            watch_request(bad, None)


def test_event_streams_are_bounded_per_caller_and_in_all() -> None:
    slots = StreamSlots(per_caller=2, total=3)
    slots.take("a")
    slots.take("a")
    with pytest.raises(ResourceExhausted, match="this caller") as refused:
        slots.take("a")
    assert refused.value.retry_after is not None and refused.value.quota
    slots.take("b")
    with pytest.raises(ResourceExhausted, match="this server"):
        slots.take("c")  # a caller with none open: the server has no room
    slots.give_back("a")
    slots.take("c")
    for caller in ("a", "b", "c"):
        slots.give_back(caller)
    for caller in ("d", "d", "e"):
        slots.take(caller)  # all given back: the room is whole again
