"""GET /api/events over real HTTP: Server-Sent Events with Watch's cursor, resumed across a
cut mid-message without losing or repeating an event; filters; heartbeats; refusals; what a
subscriber may hold (streams, events waiting, a connection that takes nothing)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httpx
import pytest
from google.protobuf import json_format

from shoal import noop, shell
from shoal.coordinator.http import sse
from shoal.v1 import admin_pb2

from .harness import Mesh, MeshFactory, eventually
from .test_sizes import MB, flood

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def mesh(mesh_factory: MeshFactory) -> Mesh:
    return await mesh_factory(slots=8, coordinator={"http_listen": "127.0.0.1:0"})


@pytest.fixture
async def http(mesh: Mesh) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=mesh.coordinator.http_url, timeout=30) as client:
        yield client


@dataclass
class Message:
    id: str | None
    event: str
    data: dict[str, Any]


@dataclass
class Reader:
    """A byte-exact SSE parser: complete messages only, as a browser dispatches them."""

    buffer: bytes = b""
    comments: list[str] = field(default_factory=list)

    def feed(self, chunk: bytes) -> list[Message]:
        self.buffer += chunk
        out = []
        while b"\n\n" in self.buffer:
            block, self.buffer = self.buffer.split(b"\n\n", 1)
            fields: dict[str, str] = {}
            for line in block.decode().split("\n"):
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                    continue
                key, _, value = line.partition(": ")
                fields[key] = value
            if "data" in fields:
                out.append(
                    Message(
                        fields.get("id"), fields.get("event", "message"), json.loads(fields["data"])
                    )
                )
        return out


def events_of(messages: list[Message]) -> list[dict[str, Any]]:
    return [e for m in messages for e in m.data.get("events", [])]


def seqs(messages: list[Message]) -> list[int]:
    return [int(e["seq"]) for e in events_of(messages)]


async def read_until(
    response: httpx.Response | AsyncIterator[bytes],
    reader: Reader,
    done: Callable[[list[Message]], bool],
    into: list[Message],
) -> None:
    """Read (a response, or its chunks read on from where they were left) until `done`."""
    chunks = response.aiter_raw() if isinstance(response, httpx.Response) else response
    async for chunk in chunks:
        into.extend(reader.feed(chunk))
        if done(into):
            return


async def test_a_subscriber_cut_mid_message_resumes_losing_and_repeating_nothing(
    mesh: Mesh, http: httpx.AsyncClient
) -> None:
    auth = {"Authorization": f"Bearer {mesh.token}"}
    # Where the stream starts: the first message has no events and gives the cursor.
    async with http.stream("GET", "/api/events", headers=auth) as first:
        assert first.headers["Content-Type"].startswith("text/event-stream")
        (start,) = [m for m in Reader().feed(await anext(first.aiter_raw())) if m.id]
    assert start.data.get("events") is None
    since = start.id
    assert since is not None

    batches, per_batch = 8, 40
    total = batches * per_batch

    def finals(messages: list[Message]) -> int:
        return sum(e.get("state") == "TASK_STATE_SUCCEEDED" for e in events_of(messages))

    def all_final(messages: list[Message]) -> bool:
        return finals(messages) >= total

    # The reference: one subscriber reading from `since` without a break.
    reference: list[Message] = []
    cut: list[Message] = []
    broken_reader = Reader()

    halfway = asyncio.Event()

    async def read_then_break(response: httpx.Response) -> None:
        """Read whole chunks until half the tasks are seen final, then half of the next one
        with events (the other half is submitted only then): the connection breaks inside a
        message."""
        async for chunk in response.aiter_raw():
            if halfway.is_set() and b"data:" in chunk:
                cut.extend(broken_reader.feed(chunk[: len(chunk) // 2]))
                return
            cut.extend(broken_reader.feed(chunk))
            if finals(cut) >= total // 2:
                halfway.set()

    async with (
        http.stream("GET", f"/api/events?since={since}", headers=auth) as whole,
        http.stream("GET", f"/api/events?cursor={since}", headers=auth) as broken,
    ):
        follower = asyncio.create_task(read_until(whole, Reader(), all_final, reference))
        breaker = asyncio.create_task(read_then_break(broken))
        for b in range(batches):
            if b == batches // 2:
                await asyncio.wait_for(halfway.wait(), 60)
            specs = [json_format.MessageToDict(noop({"b": b, "i": i})) for i in range(per_batch)]
            made = await http.post(
                "/api/shoal.v1.Tasks/SubmitBatch", json={"specs": specs}, headers=auth
            )
            assert made.status_code == 200, made.text
        await asyncio.wait_for(asyncio.gather(follower, breaker), 60)
    assert broken_reader.buffer, "the connection broke inside a message"
    assert cut and cut[-1].id is not None
    # Reconnect as a browser does: the original URL (its old ?cursor=) and Last-Event-ID.
    # The cut may fall past the last event (it was out before the cut): the resumed stream
    # then owes none, and its first message (every stream's first gives the cursor) is read.
    rest: list[Message] = []
    last = seqs(reference)[-1]

    def caught_up(got: list[Message]) -> bool:
        return last in seqs(got) or (last in seqs(cut) and bool(got))

    async with http.stream(
        "GET", f"/api/events?cursor={since}", headers={**auth, "Last-Event-ID": cut[-1].id}
    ) as resumed:
        await asyncio.wait_for(read_until(resumed, Reader(), caught_up, rest), 60)

    got = seqs(cut) + seqs(rest)
    assert got == seqs(reference)
    assert len(got) == len(set(got)) and got == sorted(got)
    assert events_of(cut + rest) == events_of(reference)
    # Each message's id is its cursor, and cursors only grow.
    ids = [int(m.id) for m in reference if m.id]
    assert ids == sorted(ids)
    assert all(int(m.data.get("cursor", 0)) == int(m.id) for m in reference if m.id)


async def test_filters_come_from_the_query(mesh: Mesh, http: httpx.AsyncClient) -> None:
    auth = {"Authorization": f"Bearer {mesh.token}"}
    other = await mesh.client.submit(shell(["true"]))
    mine = await mesh.client.submit(shell(["echo", "hello"]))
    await mesh.client.wait(mine.id)
    await mesh.client.wait(other.id)
    got: list[Message] = []
    query = f"since=0&task_id={mine.id}&output=true&states=succeeded,RUNNING"
    async with http.stream("GET", f"/api/events?{query}", headers=auth) as response:
        await read_until(
            response,
            Reader(),
            lambda ms: any(
                e.get("state") == "TASK_STATE_SUCCEEDED"
                for m in ms
                for e in m.data.get("events", [])
            ),
            got,
        )
    events = [e for m in got for e in m.data.get("events", [])]
    assert {e["taskId"] for e in events} == {mine.id}
    assert {e["state"] for e in events} <= {"TASK_STATE_RUNNING", "TASK_STATE_SUCCEEDED"}


async def test_bad_queries_and_callers_are_refused_before_the_stream(
    mesh: Mesh, http: httpx.AsyncClient
) -> None:
    auth = {"Authorization": f"Bearer {mesh.token}"}
    for query, status, words in [
        ("since=abc", 400, "since"),
        ("nope=1", 400, "unknown parameter"),
        ("output=maybe", 400, "true or false"),
        ("states=EXPLODED", 400, "states"),
        ("task_ids=" + ",".join(str(i) for i in range(1001)), 400, "at most"),
    ]:
        response = await http.get(f"/api/events?{query}", headers=auth)
        assert response.status_code == status, (query, response.text)
        assert words in response.json()["message"], response.json()
    assert (await http.get("/api/events")).status_code == 401


async def test_an_idle_stream_carries_heartbeats(
    mesh: Mesh, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sse, "HEARTBEAT_SECONDS", 0.1)
    reader = Reader()
    async with http.stream(
        "GET", "/api/events", headers={"Authorization": f"Bearer {mesh.token}"}
    ) as response:
        async for chunk in response.aiter_raw():
            reader.feed(chunk)
            if reader.comments:
                break
    assert reader.comments[0] == "keepalive"


CODE = sse._serve.__code__


def watchers() -> list[asyncio.Task[object]]:
    """The event streams this loop serves (the server runs in the test's loop)."""
    return [t for t in asyncio.all_tasks() if getattr(t.get_coro(), "cr_code", None) is CODE]


async def test_a_subscriber_that_leaves_leaves_no_watcher(
    mesh: Mesh, http: httpx.AsyncClient
) -> None:
    async with http.stream(
        "GET", "/api/events", headers={"Authorization": f"Bearer {mesh.token}"}
    ) as response:
        await anext(response.aiter_raw())
        assert len(watchers()) == 1

    def none_left() -> None:
        assert watchers() == []

    await eventually(none_left)


def feeds() -> list[asyncio.Task[object]]:
    """The shared watches this loop runs for SSE subscribers."""
    return [t for t in asyncio.all_tasks() if t.get_name() == "shoal-sse-feed"]


async def test_subscribers_of_one_query_share_one_feed(mesh: Mesh, http: httpx.AsyncClient) -> None:
    """Subscribers asking the same as the same caller are served by one watch, and get the
    same events; another query has a feed of its own; the last to leave ends it."""
    auth = {"Authorization": f"Bearer {mesh.token}"}
    got: dict[str, list[Message]] = {"a": [], "b": [], "done": []}
    async with (
        http.stream("GET", "/api/events", headers=auth) as a,
        http.stream("GET", "/api/events", headers=auth) as b,
        http.stream("GET", "/api/events?states=succeeded", headers=auth) as done,
    ):
        streams = {"a": a.aiter_raw(), "b": b.aiter_raw(), "done": done.aiter_raw()}
        readers = {name: Reader() for name in streams}
        for name, chunks in streams.items():  # up to each first message: where it starts
            await read_until(chunks, readers[name], bool, got[name])
        assert len(feeds()) == 2
        ids = await mesh.client.submit_batch([noop({"i": i}) for i in range(50)])

        def all_done(messages: list[Message]) -> bool:
            finished = {
                e["taskId"] for e in events_of(messages) if e["state"] == "TASK_STATE_SUCCEEDED"
            }
            return finished >= set(ids)

        await asyncio.wait_for(
            asyncio.gather(
                *(read_until(r, readers[n], all_done, got[n]) for n, r in streams.items())
            ),
            60,
        )
    assert events_of(got["a"]) == events_of(got["b"])
    assert {e["taskId"] for e in events_of(got["a"])} == set(ids)
    assert {e["state"] for e in events_of(got["done"])} == {"TASK_STATE_SUCCEEDED"}
    assert seqs(got["done"]) == [
        int(e["seq"]) for e in events_of(got["a"]) if e["state"] == "TASK_STATE_SUCCEEDED"
    ]

    def none_left() -> None:
        assert feeds() == [] and watchers() == []

    await eventually(none_left)


async def test_a_subscriber_joins_a_feed_from_a_recent_cursor(
    mesh: Mesh, http: httpx.AsyncClient
) -> None:
    """A subscriber that comes back with a cursor the feed still holds gets the events after
    it from the feed's recent batches, then the live ones: none lost, none twice."""
    auth = {"Authorization": f"Bearer {mesh.token}"}
    first: list[Message] = []
    later: list[Message] = []
    async with http.stream("GET", "/api/events", headers=auth) as response:
        staying = response.aiter_raw()
        reader = Reader()
        done = await mesh.client.submit_batch([noop() for _ in range(20)])
        await read_until(
            staying,
            reader,
            lambda ms: (
                {e["taskId"] for e in events_of(ms) if "SUCCEEDED" in e["state"]} >= set(done)
            ),
            first,
        )
        middle = [m for m in first if m.id][len([m for m in first if m.id]) // 2]
        assert middle.id is not None
        async with http.stream(
            "GET", "/api/events", headers={**auth, "Last-Event-ID": middle.id}
        ) as back:
            assert len(feeds()) == 1
            more = await mesh.client.submit_batch([noop() for _ in range(20)])

            def ended(ms: list[Message]) -> bool:
                return {e["taskId"] for e in events_of(ms) if "SUCCEEDED" in e["state"]} >= set(
                    more
                )

            await asyncio.wait_for(
                asyncio.gather(
                    read_until(back, Reader(), ended, later),
                    read_until(staying, reader, ended, first),
                ),
                60,
            )
    after = [n for n in seqs(first) if n > int(middle.id)]
    assert seqs(later) == after


@pytest.mark.parametrize("start", ["behind", "live"])
async def test_a_subscriber_that_does_not_read_is_cut_with_an_error_and_resumes(
    mesh_factory: MeshFactory, start: str
) -> None:
    """What the server holds for a subscriber is bounded: one that stops reading while output
    floods past the in-memory log gets an `error` event and the stream ends; from its last
    id it resumes, losing and repeating nothing. Whether it started behind (on a watch of its
    own) or live (on the shared feed)."""
    mesh = await mesh_factory(
        slots=2,
        coordinator={"http_listen": "127.0.0.1:0", "event_bytes": MB},
        max_output_bytes=32 * MB,
    )
    auth = {"Authorization": f"Bearer {mesh.token}"}
    first = await mesh.client.submit(shell(["echo", "first"]))
    got: list[Message] = []
    reader = Reader()
    async with (
        httpx.AsyncClient(base_url=mesh.coordinator.http_url, timeout=60) as http,
        http.stream(
            "GET",
            f"/api/events?since={first.created_seq - 1}&output=true"
            if start == "behind"
            else "/api/events?output=true",
            headers=auth,
        ) as stalled,
    ):
        chunks = stalled.aiter_raw()
        got += reader.feed(await anext(chunks))  # open; now it reads nothing for a while
        task = await mesh.client.submit(flood(24))
        await mesh.client.wait(task.id, timeout=timedelta(seconds=60))
        await eventually(lambda: mesh.coordinator.core.watchers_cut >= 1, timeout=30)
        async for chunk in chunks:
            got += reader.feed(chunk)
    (error,) = [m for m in got if m.event == "error"]
    assert error.data["code"] == "unavailable" and "fell behind" in str(error.data["message"])
    assert got[-1] is error
    resume_from = [m for m in got if m.id][-1].id
    assert resume_from is not None

    last = await mesh.client.submit(shell(["echo", "last"]))
    async with (
        httpx.AsyncClient(base_url=mesh.coordinator.http_url, timeout=60) as http,
        http.stream(
            "GET", "/api/events?output=true", headers={**auth, "Last-Event-ID": resume_from}
        ) as resumed,
    ):
        await read_until(
            resumed,
            Reader(),
            lambda ms: any(
                e.get("taskId") == last.id and e.get("state") == "TASK_STATE_SUCCEEDED"
                for e in events_of(ms)
            ),
            got,
        )
    numbers = seqs(got)
    assert numbers == sorted(set(numbers))  # in order, none twice
    finals = {
        e["taskId"]
        for m in got
        for e in m.data.get("events", [])
        if e.get("state") == "TASK_STATE_SUCCEEDED"
    }
    assert {first.id, task.id, last.id} <= finals


async def test_a_fast_stream_is_coalesced_into_few_messages_losing_nothing(
    mesh: Mesh, http: httpx.AsyncClient
) -> None:
    """Events that come close together go out as one message; every message still carries
    all events up to its id, in order."""
    auth = {"Authorization": f"Bearer {mesh.token}"}
    got: list[Message] = []
    reader = Reader()
    async with http.stream("GET", "/api/events", headers=auth) as response:
        chunks = response.aiter_raw()
        async for chunk in chunks:  # up to the first message: the starting cursor
            if got := reader.feed(chunk):
                break
        ids = await mesh.client.submit_batch([noop() for _ in range(300)])
        async for chunk in chunks:
            got += reader.feed(chunk)
            finished = [e for e in events_of(got) if e.get("state") == "TASK_STATE_SUCCEEDED"]
            if len(finished) >= len(ids):
                break
    live = got[1:]
    order = seqs(live)
    assert order == sorted(set(order))
    assert all(int(m.id or 0) >= max(int(e["seq"]) for e in m.data["events"]) for m in live)
    assert {e["taskId"] for e in events_of(live)} == set(ids)
    assert len(live) < len(order) / 4, (len(live), len(order))


async def test_a_caller_has_at_most_its_share_of_event_streams(
    mesh: Mesh, http: httpx.AsyncClient
) -> None:
    """A stream past a caller's share is refused (429, Retry-After) until one of its own ends;
    another caller is not held back by it."""
    auth = {"Authorization": f"Bearer {mesh.token}"}
    reader = await mesh.client.create_token(
        admin_pb2.CreateTokenRequest(name="r", role=admin_pb2.ROLE_READER)
    )
    async with contextlib.AsyncExitStack() as stack:
        streams = [
            await stack.enter_async_context(http.stream("GET", "/api/events", headers=auth))
            for _ in range(sse.MAX_STREAMS_PER_CALLER)
        ]
        assert {s.status_code for s in streams} == {200}
        refused = await http.get("/api/events", headers=auth)
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["code"] == "resource_exhausted", refused.json()
        other = {"Authorization": f"Bearer {reader.token}"}
        async with http.stream("GET", "/api/events", headers=other) as theirs:
            assert theirs.status_code == 200
        await streams[0].aclose()

        async def admitted() -> None:
            async with http.stream("GET", "/api/events", headers=auth) as again:
                assert again.status_code == 200

        await eventually(admitted)


@contextlib.asynccontextmanager
async def silent_subscriber(mesh: Mesh, query: str) -> AsyncIterator[asyncio.StreamReader]:
    """A subscriber of /api/events?`query` that takes its first message, then nothing until
    the test reads (its receive buffer small, as an attacker's)."""
    host, port = mesh.coordinator.http_url.removeprefix("http://").rstrip("/").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(
        f"GET /api/events?{query} HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {mesh.token}\r\n\r\n".encode()
    )
    try:
        await reader.readuntil(b"\r\n\r\n")  # the headers
        await reader.readuntil(b"\n\n")  # the first message: where it starts
        yield reader
    finally:
        writer.close()


async def read_until_error(reader: asyncio.StreamReader) -> bytes:
    """What `reader` gets up to the end of its first `error` event."""
    got = bytearray()
    while (at := got.find(b"event: error\n")) < 0 or got.find(b"\n\n", at) < 0:
        chunk = await reader.read(1 << 16)
        assert chunk, "the stream ended without an error event"
        got += chunk
    return bytes(got)


async def test_a_subscriber_is_cut_once_the_events_waiting_for_it_are_over_the_bound(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subscriber that takes nothing holds at most MAX_UNSENT_BYTES of events waiting, however
    much the in-memory log still holds: past it, it is cut with an `error` event, after what
    it was sent."""
    monkeypatch.setattr(sse, "MAX_UNSENT_BYTES", 256 << 10)  # the log holds 64 MB
    async with silent_subscriber(mesh, "output=true") as stalled:
        # Output in bursts: the later ones wait behind a message the subscriber does not take.
        burst = "head -c 500000 /dev/zero | tr '\\0' x; sleep 0.1"
        task = await mesh.client.submit(shell(f"for i in 1 2 3 4 5 6 7 8; do {burst}; done"))
        await eventually(lambda: mesh.coordinator.core.watchers_cut >= 1, timeout=30)
        got = await asyncio.wait_for(read_until_error(stalled), 30)
    before, _, error = got.partition(b"event: error\ndata: ")
    assert b"id: " in before  # it was sent messages before it was cut
    message = json.loads(error.split(b"\n", 1)[0])
    assert message["code"] == "unavailable" and "fell behind" in message["message"]
    await mesh.client.wait(task.id)


async def test_a_connection_that_takes_nothing_is_ended(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subscriber whose connection takes no piece of a message for STALL_SECONDS is
    disconnected, even with few events waiting for it."""
    monkeypatch.setattr(sse, "STALL_SECONDS", 0.5)
    monkeypatch.setattr(sse, "MAX_UNSENT_BYTES", 64 * MB)
    async with silent_subscriber(mesh, "output=true") as stalled:
        task = await mesh.client.submit(flood(4))
        await eventually(lambda: mesh.coordinator.core.watchers_cut >= 1, timeout=30)

        async def read_to_the_end() -> None:
            with contextlib.suppress(ConnectionResetError):
                while await stalled.read(1 << 16):
                    pass

        await asyncio.wait_for(read_to_the_end(), 30)
    await mesh.client.wait(task.id)
