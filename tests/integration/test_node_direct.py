"""A node's own service as a user meets it, with the real grpcurl: a standalone `shoal node`
runs a task through Node/Execute with no coordinator anywhere; a node's health follows
`shoal drain` and `shoal undrain`; direct tasks and the coordinator's share the node's slots."""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from shoal import shell
from shoal.node.health import executor_health_name
from shoal.v1 import node_pb2, node_pb2_grpc, task_pb2

from .harness import (
    BIN,
    CliProcesses,
    Mesh,
    MeshFactory,
    eventually,
    free_port,
    gate_script,
    run_tool,
    wait_serving,
)
from .test_grpcurl import grpcurl_call, node_protoset, ok_json

pytestmark = pytest.mark.timeout(60)

HEALTH_CHECK = "grpc.health.v1.Health/Check"
TOKEN = "standalone-secret"


def json_stream(text: str) -> list[dict[str, Any]]:
    """The messages grpcurl printed for a streaming call, one JSON document each."""
    decoder = json.JSONDecoder()
    out: list[dict[str, Any]] = []
    text = text.strip()
    while text:
        message, end = decoder.raw_decode(text)
        out.append(message)
        text = text[end:].strip()
    return out


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "node.token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


async def standalone_node(cli: CliProcesses, token_file: Path, *extra: str) -> str:
    """A `shoal node --standalone` process; its service's address once it serves."""
    address = f"127.0.0.1:{free_port()}"
    node = await cli.start(
        "node",
        "--standalone",
        "--node-id",
        "solo",
        "--listen",
        address,
        "--token-file",
        str(token_file),
        *extra,
        name="solo",
    )
    try:
        await wait_serving(address)
    except AssertionError as err:
        raise AssertionError(f"the standalone node did not come up:\n{node.output()}") from err
    return address


async def test_a_standalone_node_runs_a_task_sent_with_grpcurl(
    cli: CliProcesses, grpcurl: Path, token_file: Path, tmp_path: Path
) -> None:
    """Must-show 5: no coordinator anywhere; Node/Execute streams the task's output."""
    address = await standalone_node(cli, token_file)
    protoset = ["-protoset", str(node_protoset(tmp_path))]

    done = await grpcurl_call(
        grpcurl,
        address,
        "shoal.v1.Node/Execute",
        {"spec": {"shell": {"argv": ["echo", "hello"]}}},
        *protoset,
        token=TOKEN,
    )

    assert done.returncode == 0, f"grpcurl failed: {done.stderr}\n{cli.logs()}"
    updates = json_stream(done.stdout)
    assert "started" in updates[0]
    assert any(u.get("output", {}).get("data") == "hello\n" for u in updates), updates
    finished = updates[-1]["finished"]
    assert finished["state"] == "TASK_STATE_SUCCEEDED"
    assert finished["result"]["stdout"] == "hello\n"
    # It can be read back after the stream ended; without the token, nothing runs.
    got = ok_json(
        await grpcurl_call(
            grpcurl,
            address,
            "shoal.v1.Node/Get",
            {"task_id": updates[0]["task_id"]},
            *protoset,
            token=TOKEN,
        )
    )
    assert got["state"] == "TASK_STATE_SUCCEEDED"
    anonymous = await grpcurl_call(
        grpcurl,
        address,
        "shoal.v1.Node/Execute",
        {"spec": {"shell": {"argv": ["echo", "hello"]}}},
        *protoset,
    )
    assert anonymous.returncode != 0 and "Unauthenticated" in anonymous.stderr
    assert "cannot join" not in cli.logs()  # it never looked for a coordinator


async def test_a_standalone_node_with_auth_off_serves_anyone_on_loopback(
    cli: CliProcesses, grpcurl: Path, token_file: Path, tmp_path: Path
) -> None:
    address = await standalone_node(cli, token_file, "--no-auth")

    done = await grpcurl_call(
        grpcurl,
        address,
        "shoal.v1.Node/Execute",
        {"spec": {"python": {"code": "print(2 + 2)"}}},
        "-protoset",
        str(node_protoset(tmp_path)),
    )

    assert done.returncode == 0, done.stderr
    assert json_stream(done.stdout)[-1]["finished"]["result"]["stdout"] == "4\n"


async def test_a_standalone_node_refuses_to_start_open_or_without_a_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SHOAL_NODE_TOKEN", raising=False)
    monkeypatch.delenv("SHOAL_NODE_TOKEN_FILE", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "empty"))  # no local admin token
    shoal = str(BIN / "shoal")

    open_wide = await run_tool(
        [shoal, "node", "--standalone", "--no-auth", "--listen", "0.0.0.0:0"], timeout=20
    )
    no_token = await run_tool([shoal, "node", "--standalone", "--listen", "127.0.0.1:0"])

    assert open_wide.returncode == 1 and "auth off" in open_wide.stdout + open_wide.stderr
    assert no_token.returncode == 1 and "needs a token" in no_token.stdout + no_token.stderr


async def test_node_health_follows_shoal_drain_and_undrain(
    mesh: Mesh, grpcurl: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Must-show 3: grpcurl health Check against a node: SERVING, NOT_SERVING while drained."""
    monkeypatch.setenv("SHOAL_TOKEN", mesh.token)  # for the `shoal` commands
    protoset = ["-protoset", str(node_protoset(tmp_path))]
    shoal = str(BIN / "shoal")
    names = ["", executor_health_name("shell")]

    async def statuses() -> list[str]:
        out = []
        for name in names:
            answer = await grpcurl_call(
                grpcurl, mesh.node_address, HEALTH_CHECK, {"service": name}, *protoset
            )
            out.append(ok_json(answer)["status"])
        return out

    async def become(wanted: str) -> None:
        async def check() -> None:
            assert await statuses() == [wanted] * len(names)

        await eventually(check, timeout=15, interval=0.1)

    await become("SERVING")

    drained = await run_tool([shoal, "drain", mesh.node.node_id, "-c", mesh.address])
    assert drained.returncode == 0, drained.stderr
    await become("NOT_SERVING")

    undrained = await run_tool([shoal, "undrain", mesh.node.node_id, "-c", mesh.address])
    assert undrained.returncode == 0, undrained.stderr
    await become("SERVING")


async def test_direct_and_coordinator_tasks_share_the_nodes_slots(
    mesh_factory: MeshFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A one-slot node running a direct task makes the coordinator's task wait for the slot."""
    caplog.set_level(logging.INFO, logger="shoal.node")
    mesh = await mesh_factory(slots=1)
    gate, log = tmp_path / "gate", tmp_path / "order.log"
    async with grpc.aio.insecure_channel(mesh.node_address) as channel:
        call = node_pb2_grpc.NodeStub(channel).Execute(
            node_pb2.ExecuteRequest(spec=shell(gate_script(gate, f"echo direct >> {log}"))),
            metadata=(("authorization", f"Bearer {mesh.token}"),),
            timeout=30,
        )
        first = await call.read()
        assert isinstance(first, node_pb2.ExecuteUpdate) and first.HasField("started")

        task = await mesh.client.submit(shell(f"echo coordinator >> {log}"))

        def waits_for_the_slot() -> None:
            assert f"task={task.id} waits for a slot" in caplog.text

        await eventually(waits_for_the_slot)
        gate.touch()
        finished = await mesh.client.wait(task.id, timeout=timedelta(seconds=20))
        last = None
        while (update := await call.read()) is not grpc.aio.EOF:
            last = update
        assert isinstance(last, node_pb2.ExecuteUpdate)
        assert last.finished.state == task_pb2.TASK_STATE_SUCCEEDED

    assert finished.state == task_pb2.TASK_STATE_SUCCEEDED
    assert log.read_text().split() == ["direct", "coordinator"]
