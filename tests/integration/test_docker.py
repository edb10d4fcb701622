"""The `docker` executor on a real engine: sandbox, limits, output, files, cancel and cleanup."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from docker.errors import NotFound
from docker.models.containers import Container

from shoal import docker, retry, shell
from shoal.config import NodeSettings
from shoal.node.executors.base import ExecutionContext, Outcome
from shoal.node.executors.docker import (
    LABEL_HOST,
    LABEL_MANAGED,
    LABEL_NODE,
    LABEL_PID,
    LABEL_TASK,
    DockerExecutor,
)
from shoal.node.secrets import Redactor
from shoal.v1 import task_pb2
from tests.chaos.summary import publish

from .docker_engine import IMAGE, DockerEngine
from .harness import MeshFactory, collect, eventually
from .test_task_mistakes import no_breakers, two_nodes

pytestmark = pytest.mark.timeout(60)

NODE_ID = f"docker-tests-{os.getpid()}"
"""The id of every node and executor here: what the leftover checks and the reaping go by."""

WAIT = timedelta(seconds=20)
STDOUT, STDERR = task_pb2.OUTPUT_STREAM_STDOUT, task_pb2.OUTPUT_STREAM_STDERR
PROGRESS = task_pb2.OUTPUT_STREAM_PROGRESS


def containers(engine: DockerEngine, *labels: str) -> list[Container]:
    """Every container (running or not) that carries all `labels` ("key=value").

    Sparse: as the engine lists them, without inspecting each one after, when a container
    being removed may already be gone."""
    return engine.client.containers.list(all=True, sparse=True, filters={"label": list(labels)})


@pytest.fixture(autouse=True)
def engine(
    docker_engine: DockerEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[DockerEngine]:
    """The engine, where nodes find it; no container of this module's nodes survives a test."""
    if docker_engine.host is not None:
        monkeypatch.setenv("DOCKER_HOST", docker_engine.host)
    yield docker_engine
    left = containers(docker_engine, f"{LABEL_MANAGED}=1", f"{LABEL_NODE}={NODE_ID}")
    assert not left, f"containers left behind: {[(c.short_id, c.labels) for c in left]}"


async def run_direct(
    spec: task_pb2.TaskSpec, *, secret_env: dict[str, str] | None = None, **settings: Any
) -> tuple[Outcome, list[task_pb2.OutputChunk]]:
    """Run `spec` with a DockerExecutor of its own; returns its outcome and what it emitted."""
    executor = DockerExecutor(NodeSettings(**{"node_id": NODE_ID, **settings}))
    chunks: list[task_pb2.OutputChunk] = []
    ctx = ExecutionContext(
        f"direct-{uuid.uuid4().hex[:8]}",
        chunks.append,
        64 << 10,
        secret_env=secret_env or {},
        redactor=Redactor((secret_env or {}).values()),
    )
    try:
        assert await executor.async_available()
        async with asyncio.timeout(30):
            outcome = await executor.run(spec, ctx)
    finally:
        await executor.aclose()
    return outcome, chunks


def said(chunks: list[task_pb2.OutputChunk], stream: int) -> str:
    return "".join(c.data for c in chunks if c.stream == stream)


async def test_output_streams_as_it_comes_and_ends_in_the_result(
    mesh_factory: MeshFactory,
) -> None:
    mesh = await mesh_factory(slots=2, node_id=NODE_ID, secrets={"API_TOKEN": "hunter2-secret"})
    script = 'echo hello; echo "token=$(cat /run/secrets/API_TOKEN)"; echo oops >&2'
    spec = docker(IMAGE, ["sh", "-c", script])
    spec.secrets.add(name="API_TOKEN")

    async with asyncio.timeout(WAIT.total_seconds()):
        events = [e async for e in mesh.client.run(spec)]

    final = events[-1]
    assert final.state == task_pb2.TASK_STATE_SUCCEEDED, final
    chunks = [e.output for e in events if e.HasField("output")]
    assert said(chunks, STDOUT) == "hello\ntoken=***\n"
    assert said(chunks, STDERR) == "oops\n"
    assert (final.result.stdout, final.result.stderr) == ("hello\ntoken=***\n", "oops\n")
    assert final.result.exit_code == 0
    assert "hunter2" not in str(events)


async def test_secrets_are_files_of_the_container_user_and_the_engine_shows_none(
    engine: DockerEngine,
) -> None:
    value = "hunter2-docker-secret"
    executor = DockerExecutor(NodeSettings(node_id=NODE_ID))
    chunks: list[task_pb2.OutputChunk] = []
    ctx = ExecutionContext(
        f"secrets-{uuid.uuid4().hex[:8]}",
        chunks.append,
        64 << 10,
        secret_env={"API_TOKEN": value},
        redactor=Redactor([value]),
    )
    script = (
        "stat -c '%a %u %n' /run/secrets /run/secrets/API_TOKEN;"
        ' sha256sum < /run/secrets/API_TOKEN; echo "env=[$API_TOKEN]";'
        " echo x > /run/secrets/other || echo read-only; exec sleep 60"
    )
    spec = docker(IMAGE, ["sh", "-c", script])
    assert await executor.async_available()
    running = asyncio.create_task(executor.run(spec, ctx))
    try:

        def listed() -> Container:
            found = containers(engine, f"{LABEL_TASK}={ctx.task_id}")
            assert "env=" in said(chunks, STDOUT) and len(found) == 1
            return found[0]

        container = await eventually(lambda: asyncio.to_thread(listed), timeout=20)
        assert container.id is not None
        attrs = await asyncio.to_thread(engine.client.api.inspect_container, container.id)
        assert not [e for e in attrs["Config"]["Env"] or [] if e.startswith("API_TOKEN")]
        assert value not in json.dumps(attrs)
        [mount] = [m for m in attrs["Mounts"] if m["Destination"] == "/run/secrets"]
        assert mount["RW"] is False
        await asyncio.to_thread(container.kill)
        async with asyncio.timeout(20):
            await running
    finally:
        running.cancel()
        await executor.aclose()

    digest = hashlib.sha256(value.encode()).hexdigest()
    assert said(chunks, STDOUT) == (
        "500 65534 /run/secrets\n400 65534 /run/secrets/API_TOKEN\n"
        f"{digest}  -\nenv=[]\nread-only\n"
    )
    # Removed with the container: nothing of it stays on the node's tmpfs.
    assert not await asyncio.to_thread(Path(mount["Source"]).parent.exists)


async def test_the_sandbox_has_no_network_no_privileges_and_a_read_only_root() -> None:
    reached: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reached.append(await reader.read(1024))
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 12\r\n\r\nhost-reached")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    script = (
        "echo interfaces: $(tail -n +3 /proc/net/dev | cut -d: -f1);"
        " id -u; grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status;"
        " touch /x || echo root-read-only;"
        " echo scratch > /tmp/t && cat /tmp/t;"
        f" wget -q -T 2 -O - http://127.0.0.1:{port}/ || echo no-host-service"
    )
    async with server:
        outcome, chunks = await run_direct(docker(IMAGE, ["sh", "-c", script]))

    assert outcome.state == task_pb2.TASK_STATE_SUCCEEDED, outcome
    lines = outcome.result.stdout.splitlines()
    assert "interfaces: lo" in lines
    assert "65534" in lines
    assert "CapEff:\t0000000000000000" in lines
    assert "CapBnd:\t0000000000000000" in lines  # none to gain, even by a setuid file
    assert "NoNewPrivs:\t1" in lines
    assert "root-read-only" in lines
    assert "Read-only file system" in outcome.result.stderr
    assert "scratch" in lines
    assert "no-host-service" in lines and "host-reached" not in outcome.result.stdout
    assert reached == []
    assert said(chunks, STDOUT) == outcome.result.stdout


async def test_a_fork_bomb_stops_at_the_pids_limit_and_the_node_goes_on(
    mesh_factory: MeshFactory,
) -> None:
    mesh = await mesh_factory(slots=2, node_id=NODE_ID)
    bomb = "n=0; while [ $n -lt 1000 ]; do sleep 60 & n=$((n+1)); done; echo all $n started"

    started = time.monotonic()
    task = await mesh.client.submit(docker(IMAGE, ["sh", "-c", bomb], pids=32))
    final = await mesh.client.wait(task.id, timeout=WAIT)
    elapsed = time.monotonic() - started
    after = [
        await mesh.client.submit(s) for s in (docker(IMAGE, ["echo", "fine"]), shell("echo fine"))
    ]
    done = [await mesh.client.wait(t.id, timeout=WAIT) for t in after]

    assert final.state == task_pb2.TASK_STATE_FAILED, final
    assert final.result.exit_code != 0
    assert "can't fork" in final.result.stderr
    assert "started" not in final.result.stdout
    assert [(t.state, t.result.stdout) for t in done] == [
        (task_pb2.TASK_STATE_SUCCEEDED, "fine\n"),
        (task_pb2.TASK_STATE_SUCCEEDED, "fine\n"),
    ]
    publish(f"docker: a fork bomb under pids=32 ended in {elapsed:.2f} s")


async def test_a_memory_hog_fails_with_the_out_of_memory_reason() -> None:
    hog = docker(IMAGE, ["sh", "-c", "head -c 100m /dev/zero | tail"], memory_mb=16)

    outcome, _ = await run_direct(hog)

    assert outcome.state == task_pb2.TASK_STATE_FAILED, outcome
    assert outcome.result.error == "out of memory: the container went over its 16 MB limit"
    assert not outcome.result.infrastructure_failure


async def test_cancel_and_timeout_remove_the_container(
    mesh_factory: MeshFactory, engine: DockerEngine
) -> None:
    mesh = await mesh_factory(slots=2, node_id=NODE_ID)
    task = await mesh.client.submit(docker(IMAGE, ["sh", "-c", "echo started; exec sleep 60"]))
    watch = mesh.client.watch(since=task.created_seq - 1, task_ids=[task.id], output=True)
    async with asyncio.timeout(WAIT.total_seconds()):
        await collect(watch, lambda e: "started" in e.output.data)

    label = f"{LABEL_TASK}={task.id}"
    running = await asyncio.to_thread(containers, engine, label)
    assert [c.status for c in running] == ["running"]
    cancelled_at = time.monotonic()
    await mesh.client.cancel(task.id)

    async def gone(label: str) -> None:
        assert await asyncio.to_thread(containers, engine, label) == []

    await eventually(lambda: gone(label), timeout=10)
    removal = time.monotonic() - cancelled_at
    final = await mesh.client.wait(task.id, timeout=WAIT)
    assert final.state == task_pb2.TASK_STATE_CANCELLED, final
    publish(f"docker: cancel removed the running container in {removal * 1000:.0f} ms")

    slow = await mesh.client.submit(docker(IMAGE, ["sleep", "60"], timeout=timedelta(seconds=1)))
    final = await mesh.client.wait(slow.id, timeout=WAIT)
    assert final.state == task_pb2.TASK_STATE_TIMED_OUT, final
    await eventually(lambda: gone(f"{LABEL_TASK}={slow.id}"), timeout=10)


async def test_input_files_env_and_workdir_reach_the_container() -> None:
    script = (
        'pwd; cat /work/in.txt; echo "$GREETING"; sh run.sh;'
        " echo more >> /work/in.txt || echo inputs-read-only"
    )
    spec = docker(
        IMAGE,
        ["sh", "-c", script],
        env={"GREETING": "hi there"},
        workdir="/work/scripts",
        files={"/work/in.txt": b"input data\n", "/work/scripts/run.sh": "echo from the script\n"},
    )

    outcome, _ = await run_direct(spec)

    assert outcome.state == task_pb2.TASK_STATE_SUCCEEDED, outcome
    assert outcome.result.stdout == (
        "/work/scripts\ninput data\nhi there\nfrom the script\ninputs-read-only\n"
    )


@pytest.mark.parametrize(
    ("spec", "error", "exit_code"),
    [
        (
            docker("shoal-test/missing:1", ["true"]),
            "image shoal-test/missing:1 is not on this node (pull policy never)",
            0,
        ),
        (docker(IMAGE, ["true"], network=True), "docker_allow_network", 0),
        (docker(IMAGE, ["true"], memory_mb=4096), "at most 512 MB (docker_memory_mb)", 0),
        (docker(IMAGE, ["true"], pids=100_000), "at most 128 (docker_pids)", 0),
        (docker(IMAGE, ["true"], cpus=4.0), "at most 1 (docker_cpus)", 0),
        (docker(IMAGE, ["cat"], files={"/etc/passwd": b"x"}), "input files go under /work/", 0),
        (docker(IMAGE, ["no-such-command"]), "executable file not found", 127),
    ],
    ids=[
        "missing-image",
        "network",
        "memory",
        "pids",
        "cpus",
        "files-outside-work",
        "bad-command",
    ],
)
async def test_what_a_task_cannot_have_is_a_clear_task_failure(
    spec: task_pb2.TaskSpec, error: str, exit_code: int
) -> None:
    outcome, chunks = await run_direct(spec)

    assert outcome.state == task_pb2.TASK_STATE_FAILED, outcome
    assert error in outcome.result.error
    assert outcome.result.exit_code == exit_code
    assert not outcome.result.infrastructure_failure
    assert chunks == []


async def test_pull_policies() -> None:
    here, here_chunks = await run_direct(docker(IMAGE, ["echo", "local"], pull="if_missing"))
    # No registry is reachable from here: the pull fails, after saying that it pulls.
    pulled, pulled_chunks = await run_direct(docker(IMAGE, ["true"], pull="always"))

    assert here.state == task_pb2.TASK_STATE_SUCCEEDED, here
    assert said(here_chunks, PROGRESS) == ""
    assert pulled.state == task_pb2.TASK_STATE_FAILED, pulled
    assert said(pulled_chunks, PROGRESS) == f"pulling image {IMAGE}\n"
    assert IMAGE in pulled.result.error


async def test_an_engine_that_does_not_answer_is_an_infrastructure_failure(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'no-engine.sock'}")
    executor = DockerExecutor(NodeSettings(node_id=NODE_ID))
    chunks: list[task_pb2.OutputChunk] = []

    assert not await executor.async_available()
    outcome = await executor.run(
        docker(IMAGE, ["true"]), ExecutionContext("unreachable", chunks.append, 1024)
    )

    assert outcome.state == task_pb2.TASK_STATE_FAILED
    assert outcome.result.infrastructure_failure
    assert "docker engine failed while connecting" in outcome.result.error
    await executor.aclose()


async def test_a_starting_node_removes_its_leftover_containers_only(
    mesh_factory: MeshFactory, engine: DockerEngine
) -> None:
    def leave(node_id: str, pid: int | None = None) -> Container:
        labels = {LABEL_MANAGED: "1", LABEL_NODE: node_id, LABEL_TASK: "left-behind"}
        labels[LABEL_HOST] = socket.gethostname()
        if pid is not None:
            labels[LABEL_PID] = str(pid)
        container = engine.client.containers.create(
            IMAGE, ["sleep", "60"], labels=labels, network_mode="none"
        )
        container.start()
        return container

    # A node process that is gone, with a generated id (a new one at each start).
    gone = await asyncio.create_subprocess_exec("true")
    await gone.wait()
    mine = await asyncio.to_thread(leave, NODE_ID)
    orphan = await asyncio.to_thread(leave, "", gone.pid)
    other = await asyncio.to_thread(leave, f"{NODE_ID}-other", os.getppid())  # it runs
    try:
        await mesh_factory(slots=1, node_id=NODE_ID)

        for left in (mine, orphan):
            with pytest.raises(NotFound):
                await asyncio.to_thread(left.reload)
        await asyncio.to_thread(other.reload)
        assert other.status == "running"
    finally:
        await asyncio.to_thread(other.remove, force=True)


async def test_images_no_node_has_open_no_breaker(mesh_factory: MeshFactory) -> None:
    mesh = await two_nodes(mesh_factory)
    once = retry(3, on_exit=False, backoff=timedelta(milliseconds=10))  # infrastructure only

    specs = (docker(f"shoal-test/absent-{i}:1", ["true"], retry=once) for i in range(12))
    ids = await mesh.client.submit_batch(specs)
    done = await asyncio.gather(*(mesh.client.wait(i, timeout=WAIT) for i in ids))

    for task in done:
        assert task.state == task_pb2.TASK_STATE_FAILED, task
        assert "is not on this node (pull policy never)" in task.result.error
        assert not task.result.infrastructure_failure and not task.attempts
    await no_breakers(mesh.client)
    other = await mesh.client.wait((await mesh.client.submit(docker(IMAGE, ["true"]))).id)
    assert other.state == task_pb2.TASK_STATE_SUCCEEDED, other
