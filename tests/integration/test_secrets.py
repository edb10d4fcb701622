"""Task secrets end to end: the node resolves them, the task sees them, nobody else does."""

from __future__ import annotations

import asyncio
import base64
import logging
from datetime import timedelta
from pathlib import Path

import pytest
from google.protobuf import json_format

from shoal import AsyncClient, shell
from shoal.specs import is_final
from shoal.v1 import admin_pb2, task_pb2
from tests.contract.loopback import LoopbackHttp

from .harness import Mesh, MeshFactory, eventually, gate_script

pytestmark = pytest.mark.timeout(30)

WAIT = timedelta(seconds=15)
TOKEN = "tok-7f3a9c1e5b2d"  # inline, exposed as $TOKEN
DB_PASSWORD = "pw-0d4e8b6a2c9f"  # a file in secrets_dir, exposed under its own name
VALUES = (TOKEN, DB_PASSWORD)


@pytest.fixture
async def mesh(mesh_factory: MeshFactory, tmp_path: Path) -> Mesh:
    """A mesh whose node holds TOKEN (inline) and DB_PASSWORD (in secrets_dir)."""
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "DB_PASSWORD").write_text(DB_PASSWORD + "\n")
    return await mesh_factory(slots=2, secrets={"api-token": TOKEN}, secrets_dir=secrets_dir)


def stored_bytes(data_dir: Path) -> bytes:
    """The coordinator's SQLite database and its write-ahead log, as bytes."""
    files = [data_dir / "shoal.db", data_dir / "shoal.db-wal"]
    return b"".join(f.read_bytes() for f in files if f.exists())


def shows_no_value(text: str | bytes) -> None:
    """Assert that no secret value occurs in `text` (bytes are searched byte for byte)."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")  # one character per byte: ASCII values still match
    for value in VALUES:
        assert value not in text, f"{value!r} leaked"


async def test_task_uses_its_secrets_and_no_output_shows_them(
    mesh: Mesh, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    gate = tmp_path / "gate"
    # The last line writes TOKEN's head in one write, then waits: it reaches the node in one
    # chunk and its tail in another, after the gate opens.
    script = (
        'echo "out:$TOKEN"; echo "err:$TOKEN" >&2; echo "db:$DB_PASSWORD"; '
        'printf \'start:%s\' "${TOKEN%"${TOKEN#??????}"}"; '
        + gate_script(gate, 'printf "%s:end\\n" "${TOKEN#??????}"')
    )
    spec = shell(script, name="secretive")
    spec.secrets.add(name="api-token", env="TOKEN")
    spec.secrets.add(name="DB_PASSWORD")

    outputs: list[task_pb2.Event] = []
    task_id = ""
    async for event in mesh.client.run(spec):
        task_id = event.task_id
        if event.HasField("output"):
            outputs.append(event)
            stdout = "".join(
                e.output.data for e in outputs if e.output.stream == task_pb2.OUTPUT_STREAM_STDOUT
            )
            if "start:" in stdout and not gate.exists():
                gate.touch()
        elif is_final(event.state):
            break
    done = await mesh.client.wait(task_id, timeout=WAIT)
    got = await mesh.client.get(task_id)

    assert done.state == task_pb2.TASK_STATE_SUCCEEDED, done.result.error
    by_stream = {
        stream: "".join(e.output.data for e in outputs if e.output.stream == stream)
        for stream in (task_pb2.OUTPUT_STREAM_STDOUT, task_pb2.OUTPUT_STREAM_STDERR)
    }
    assert by_stream[task_pb2.OUTPUT_STREAM_STDOUT] == "out:***\ndb:***\nstart:***:end\n"
    assert by_stream[task_pb2.OUTPUT_STREAM_STDERR] == "err:***\n"
    # TOKEN's head was held back until its tail arrived in a later chunk.
    assert any(e.output.data.endswith("start:") for e in outputs)
    for event in outputs:
        shows_no_value(event.output.data)
    assert done.result.stdout == "out:***\ndb:***\nstart:***:end\n"
    assert done.result.stderr == "err:***\n"
    assert [(r.name, r.env) for r in got.spec.secrets] == [
        ("api-token", "TOKEN"),
        ("DB_PASSWORD", ""),
    ]
    shows_no_value(got.SerializeToString())
    shows_no_value(str(got))

    def stored() -> bytes:
        data = stored_bytes(mesh.data_dir)
        assert b"out:***" in data  # the result is stored: the check below sees it
        return data

    shows_no_value(await eventually(stored))
    shows_no_value(caplog.text)
    for record in caplog.records:
        shows_no_value(record.getMessage())


async def test_missing_secret_fails_the_task_naming_it(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    spec = shell('echo "$TOKEN $NOPE"')
    spec.secrets.add(name="api-token", env="TOKEN")
    spec.secrets.add(name="NOPE")
    spec.secrets.add(name="ALSO_ABSENT")

    done = await mesh.client.wait((await mesh.client.submit(spec)).id, timeout=WAIT)

    assert done.state == task_pb2.TASK_STATE_FAILED
    assert not done.result.infrastructure_failure  # the task's: no breaker counts it
    assert "'NOPE'" in done.result.error and "'ALSO_ABSENT'" in done.result.error
    assert mesh.node.node_id in done.result.error
    assert "'api-token'" not in done.result.error
    assert not done.result.stdout
    shows_no_value(done.result.error)
    assert any("'NOPE'" in r.getMessage() for r in caplog.records if r.name == "shoal.node")
    shows_no_value(caplog.text)


async def test_rotated_secret_file_is_used_by_the_next_task(mesh: Mesh, tmp_path: Path) -> None:
    spec = shell('test "$DB_PASSWORD" = rotated-value && echo "db:$DB_PASSWORD"')
    spec.secrets.add(name="DB_PASSWORD")
    await asyncio.to_thread((tmp_path / "secrets" / "DB_PASSWORD").write_text, "rotated-value\n")

    done = await mesh.client.wait((await mesh.client.submit(spec)).id, timeout=WAIT)

    assert done.state == task_pb2.TASK_STATE_SUCCEEDED, done.result.stderr
    assert done.result.stdout == "db:***\n"


async def test_tasks_do_not_inherit_the_nodes_shoal_settings(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The in-process node's environment is this process's: a token set for it must not leak.
    monkeypatch.setenv("SHOAL_NODE_TOKEN", "shoal_abc_node-secret")
    task = await mesh.client.submit(shell(["env"]))
    done = await mesh.client.wait(task.id, timeout=WAIT)

    assert done.state == task_pb2.TASK_STATE_SUCCEEDED
    assert "PATH=" in done.result.stdout
    # Only what the node gives every task on purpose: where to report progress.
    given = {"SHOAL_PROGRESS", "SHOAL_PROGRESS_FD"}
    names = {line.partition("=")[0] for line in done.result.stdout.splitlines()}
    assert not {n for n in names if n.startswith("SHOAL_")} - given, done.result.stdout
    assert "node-secret" not in done.result.stdout


async def test_a_tenant_gets_only_the_secrets_granted_to_it(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(
        slots=2,
        secrets={"key-a": TOKEN, "key-b": DB_PASSWORD},
        secret_tenants={"key-a": ["acme"], "key-b": ["globex"]},
    )
    made = await mesh.client.create_token(
        admin_pb2.CreateTokenRequest(name="acme", role=admin_pb2.ROLE_SUBMITTER, tenant="acme")
    )
    acme = AsyncClient(mesh.address, token=made.token)
    try:
        theirs = shell('echo "$B"')
        theirs.secrets.add(name="key-b", env="B")
        # Neither acme nor a task without a tenant gets globex's secret: as many refusals as
        # would open a breaker, were they the node's failures.
        refused = [await acme.submit(theirs) for _ in range(4)]
        refused.append(await mesh.client.submit(theirs))
        # Its own secret is acme's, and its encodings are masked like its value.
        mine = shell(
            'printf "%s\\n" "$A"; printf "%s" "$A" | base64;'
            ' printf "%s" "$A" | od -An -tx1 | tr -d " \\n"'
        )
        mine.secrets.add(name="key-a", env="A")
        ok = await acme.wait((await acme.submit(mine)).id, timeout=WAIT)

        for task in refused:
            done = await mesh.client.wait(task.id, timeout=WAIT)
            assert done.state == task_pb2.TASK_STATE_FAILED
            assert (
                not done.result.infrastructure_failure
            )  # the task's mistake: no retry, no breaker
            assert len(done.attempts) <= 1
            assert "'key-b'" in done.result.error and "not granted" in done.result.error
            assert "globex" not in done.result.error
            assert not done.result.stdout
            shows_no_value(done.result.error)
        assert [t.spec.tenant for t in refused] == ["acme"] * 4 + [""]
        assert ok.state == task_pb2.TASK_STATE_SUCCEEDED, ok.result.error
        assert ok.result.stdout == "***\n***\n***", ok.result.stdout
        assert base64.b64encode(TOKEN.encode()).decode() not in ok.result.stdout
        node = next(n for n in await mesh.client.nodes() if n.info.node_id == mesh.node.node_id)
        assert list(node.breakers) == []
    finally:
        await acme.close()


async def test_an_http_header_takes_a_secret_that_only_the_server_sees(
    mesh_factory: MeshFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with LoopbackHttp() as server:
        mesh = await mesh_factory(
            slots=1, secrets={"api-token": TOKEN}, http_allow_hosts=[f"127.0.0.1:{server.port}"]
        )
        header = "Bearer ${{ secrets.api-token }}"
        spec = task_pb2.TaskSpec(
            http=task_pb2.HttpSpec(url=server.url("/echo"), headers={"Authorization": header})
        )
        spec.secrets.add(name="api-token", env="TOKEN")

        done = await mesh.client.wait((await mesh.client.submit(spec)).id, timeout=WAIT)

        assert done.state == task_pb2.TASK_STATE_SUCCEEDED, done.result.error
        [(_, sent)] = server.received
        assert sent["authorization"] == f"Bearer {TOKEN}"
        echoed = json_format.MessageToDict(done.result.output)["json"]["headers"]
        assert echoed["authorization"] == "Bearer ***"
        assert done.spec.http.headers["Authorization"] == header  # the reference, as submitted
        shows_no_value(done.SerializeToString())

        def stored() -> bytes:
            data = stored_bytes(mesh.data_dir)
            assert b"Bearer ***" in data  # the result is stored: the check below sees it
            return data

        shows_no_value(await eventually(stored))
        shows_no_value(caplog.text)
