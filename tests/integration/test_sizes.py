"""Large messages never break a session, and memory stays bounded in bytes (issue 16).

A task printing as fast as it can, specs that weigh close to the limit, upstream outputs
expanded many times, watchers that do not read and strangers sending large bodies.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from shoal import noop, shell
from shoal._server import method_path
from shoal.v1 import task_pb2, tasks_pb2

from .harness import CliProcesses, Mesh, MeshFactory, eventually, free_port

pytestmark = pytest.mark.timeout(90)

WAIT = timedelta(seconds=60)
MB = 1 << 20


async def session_started(mesh: Mesh) -> int:
    """When the node's current session began (ns): a reconnect changes it."""
    (node,) = await mesh.client.nodes()
    assert node.connected
    return node.connected_at.ToNanoseconds()


def flood(megabytes: int) -> task_pb2.TaskSpec:
    """A task printing `megabytes` MB to stdout as fast as it can, and a last line."""
    return shell(f"head -c {megabytes * MB} /dev/zero | tr '\\0' x; echo; echo the-end")


async def streamed(mesh: Mesh, task: task_pb2.Task) -> tuple[str, task_pb2.Event]:
    """The output a watcher of the task receives, and its final event."""
    parts: list[str] = []
    async for event in mesh.client.watch(
        since=task.created_seq - 1, task_ids=[task.id], output=True
    ):
        if event.HasField("output"):
            parts.append(event.output.data)
        elif event.state in (task_pb2.TASK_STATE_SUCCEEDED, task_pb2.TASK_STATE_FAILED):
            return "".join(parts), event
    raise AssertionError("the watch ended before the task")


async def test_task_printing_50mb_succeeds_capped_and_keeps_the_session(
    mesh_factory: MeshFactory,
) -> None:
    mesh = await mesh_factory(slots=4, coordinator={"event_bytes": 4 * MB})
    session = await session_started(mesh)
    task = await mesh.client.submit(flood(50))

    output, final = await asyncio.wait_for(streamed(mesh, task), WAIT.total_seconds())

    assert final.state == task_pb2.TASK_STATE_SUCCEEDED
    assert "bytes of output cut here" in output
    cap = mesh.node.settings.max_output_bytes
    assert cap == 8 * MB  # the default
    assert output.endswith("x\nthe-end\n")  # the tail is kept
    assert len(output) < cap + mesh.node.settings.output_tail_bytes + 1024
    done = await mesh.client.get(task.id)
    assert done.result.stdout.endswith("the-end\n")
    assert await session_started(mesh) == session  # never reconnected
    assert mesh.coordinator.core.events.bytes <= 4 * MB  # output held by the coordinator


async def test_twenty_900kb_specs_to_a_32_slot_node_all_finish(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(slots=1)
    # 900 kB of arguments, in pieces under the kernel's limit for one argument.
    spec = shell(["sh", "-c", "exit 0", *["y" * 100_000] * 9], labels={"big": "yes"})
    ids: list[str] = []
    for _ in range(4):  # under the message limit per request
        ids += await mesh.client.submit_batch([spec] * 5)
    # Dispatched all at once, to one node: 18 MB of assignments.
    await mesh.start_node(slots=32, labels={"big": "yes"})

    done = await asyncio.gather(*(mesh.client.wait(i, timeout=WAIT) for i in ids))

    assert [t.state for t in done] == [task_pb2.TASK_STATE_SUCCEEDED] * 20
    assert {t.attempt.number for t in done} == {1}  # no session was lost under them


async def test_upstream_output_expanded_over_the_limit_fails_that_task(mesh: Mesh) -> None:
    session = await session_started(mesh)
    upstream = await mesh.client.submit(noop({"blob": "z" * 300_000}))
    # 60 copies of 300 kB: 18 MB once expanded, from a spec of a few kB.
    refs = ["${{ deps[0].output.blob }}"] * 60
    dependent = await mesh.client.submit(shell(["true", *refs], depends_on=[upstream.id]))

    done = await mesh.client.wait(dependent.id, timeout=WAIT)

    assert done.state == task_pb2.TASK_STATE_FAILED
    assert "max_rendered_spec_bytes" in done.result.error
    assert not done.result.infrastructure_failure
    assert not done.node_id  # never dispatched
    assert await session_started(mesh) == session
    after = await mesh.client.wait(
        (await mesh.client.submit(shell(["echo", "fine"]))).id, timeout=WAIT
    )
    assert after.state == task_pb2.TASK_STATE_SUCCEEDED


async def test_a_watcher_that_does_not_read_is_cut_and_resumes_losing_nothing(
    mesh_factory: MeshFactory,
) -> None:
    mesh = await mesh_factory(slots=2, coordinator={"event_bytes": MB}, max_output_bytes=32 * MB)
    first = await mesh.client.submit(shell(["echo", "first"]))
    watch = mesh.client.watch(since=first.created_seq - 1, output=True)
    seen = [await anext(watch)]  # the watch is open; now it reads nothing for a while
    task = await mesh.client.submit(flood(24))
    await mesh.client.wait(task.id, timeout=WAIT)
    await eventually(lambda: mesh.coordinator.core.watchers_cut >= 1, timeout=30)
    last = await mesh.client.submit(shell(["echo", "last"]))

    async for event in watch:  # reconnects from its cursor by itself
        seen.append(event)
        if event.task_id == last.id and event.state == task_pb2.TASK_STATE_SUCCEEDED:
            break

    seqs = [e.seq for e in seen]
    assert seqs == sorted(set(seqs))  # in order, none twice
    finals = {e.task_id for e in seen if e.state == task_pb2.TASK_STATE_SUCCEEDED}
    assert {first.id, task.id, last.id} <= finals  # every outcome, replayed from the store
    await watch.aclose()


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory (bytes), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


async def test_large_unauthenticated_bodies_are_refused_before_they_are_read(
    cli: CliProcesses, tmp_path: Path
) -> None:
    port = free_port()
    coordinator = await cli.coordinator(port, tmp_path / "data")
    before = _peak_rss(coordinator.pid)
    body = b"\n" + b"\xff" * (15 * MB)  # a 15 MB request, never a valid one
    options = [("grpc.max_send_message_length", 32 * MB)]

    async def stranger() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            submit = channel.unary_unary(
                method_path(tasks_pb2.DESCRIPTOR, "Tasks", "Submit"),
                request_serializer=lambda b: b,
                response_deserializer=tasks_pb2.SubmitResponse.FromString,
            )
            try:
                await submit(body, timeout=30)
            except grpc.aio.AioRpcError as err:
                return err.code()
            return grpc.StatusCode.OK

    codes = await asyncio.gather(*(stranger() for _ in range(32)))

    assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}
    # 32 bodies of 15 MB read whole would be 480 MB; each stream buffers at most 64 kB.
    assert _peak_rss(coordinator.pid) - before < 40 * MB, cli.logs()
