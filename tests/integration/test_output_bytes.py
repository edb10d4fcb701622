"""Output that is not UTF-8 reaches clients byte for byte; its text views stay valid."""

from __future__ import annotations

import asyncio
import os

import pytest

from shoal import Event, chunk_bytes, python, stderr_bytes, stdout_bytes
from shoal.specs import is_final
from shoal.v1 import task_pb2

from .harness import BIN, Mesh, MeshFactory, collect

pytestmark = pytest.mark.timeout(60)

EVERY_BYTE = bytes(range(256))
WRITE_EVERY_BYTE = (
    "import sys\n"
    "sys.stdout.buffer.write(bytes(range(256)))\n"
    "sys.stderr.buffer.write(bytes(range(255, -1, -1)))\n"
)
SECRET = "s3cr3t-value-42"


def streamed(events: list[Event], stream: int) -> bytes:
    return b"".join(
        chunk_bytes(e.output) for e in events if e.HasField("output") and e.output.stream == stream
    )


async def test_every_byte_value_round_trips_to_the_sdk(mesh: Mesh) -> None:
    events = await collect(
        mesh.client.run(python(WRITE_EVERY_BYTE)),
        lambda e: is_final(e.state) and not e.HasField("output"),
    )
    stored = await mesh.client.get(events[-1].task_id)

    assert stored.state == task_pb2.TASK_STATE_SUCCEEDED, stored.result
    assert streamed(events, task_pb2.OUTPUT_STREAM_STDOUT) == EVERY_BYTE
    assert streamed(events, task_pb2.OUTPUT_STREAM_STDERR) == EVERY_BYTE[::-1]
    for result in (events[-1].result, stored.result):
        assert stdout_bytes(result) == EVERY_BYTE
        assert stderr_bytes(result) == EVERY_BYTE[::-1]
        # A client that reads the text sees valid UTF-8, each stray byte as U+FFFD.
        assert result.stdout == EVERY_BYTE.decode(errors="replace")


async def test_utf8_output_carries_no_second_copy(mesh: Mesh) -> None:
    events = await collect(
        mesh.client.run(python("print('héllo ✓')")),
        lambda e: is_final(e.state) and not e.HasField("output"),
    )

    result = events[-1].result
    assert result.stdout == "héllo ✓\n" and result.stdout_raw == b""
    assert all(not e.output.raw for e in events if e.HasField("output"))


async def test_shoal_run_writes_the_tasks_bytes_to_stdout(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHOAL_TOKEN", mesh.token)
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "shoal"),
        "run",
        "-c",
        mesh.address,
        "--python",
        WRITE_EVERY_BYTE,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=os.environ,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)

    assert proc.returncode == 0, err
    assert out == EVERY_BYTE
    assert err.endswith(EVERY_BYTE[::-1])  # after the line naming the task


async def test_secrets_are_hidden_in_output_that_is_not_utf8(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(slots=1, secrets={"api-token": SECRET}, output_tail_bytes=40)
    code = (
        "import os, sys\n"
        "token = os.environ['API_TOKEN'].encode()\n"
        "sys.stdout.buffer.write(b'\\xff' + token + b'\\xfe' + bytes(range(128, 256)))\n"
    )
    spec = python(code)
    spec.secrets.add(name="api-token", env="API_TOKEN")
    events = await collect(
        mesh.client.run(spec), lambda e: is_final(e.state) and not e.HasField("output")
    )

    sent = streamed(events, task_pb2.OUTPUT_STREAM_STDOUT)
    assert sent == b"\xff***\xfe" + bytes(range(128, 256))
    assert SECRET.encode() not in sent
    # The result keeps the last 40 characters: here each is one byte.
    assert stdout_bytes(events[-1].result) == sent[-40:]
