"""`@shoal.task` functions through a real mesh: warm worker processes on a real node."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

import shoal
from shoal import TaskFailed
from shoal._function import MAP_BATCH
from shoal.config import ADMIN_TOKEN_FILE
from shoal.v1 import task_pb2

from . import functions_module as fm
from .harness import BIN, CliProcesses, Mesh, MeshFactory, eventually, run_tool
from .test_grpcurl import grpcurl_call, ok_json

MODULE = "tests.integration.functions_module"


@pytest.fixture
async def mesh(mesh_factory: MeshFactory) -> Mesh:
    return await mesh_factory(slots=2, imports=[MODULE])


async def _running(mesh: Mesh, task_id: str) -> None:
    async def check() -> None:
        task = await mesh.client.get(task_id)
        assert task.state == task_pb2.TASK_STATE_RUNNING

    await eventually(check, timeout=30)


async def test_calls_return_typed_values_and_raise_remote_errors(mesh: Mesh) -> None:
    offered = set(mesh.node.info().functions)
    assert {f"{MODULE}:add", f"{MODULE}:greet", f"{MODULE}:midpoint"} <= offered
    client = mesh.client
    assert await (await fm.add.async_submit(client, 2, 3)).result() == 5
    greeting = await fm.greet.async_submit(client, "ada", punctuation="?")
    assert await greeting.result() == "hello ada?"
    task = await greeting.task()
    assert "greeting ada" in task.result.stdout  # print, captured
    assert "logged for ada" in task.result.stderr  # logging, captured
    point = await (await fm.midpoint.async_submit(client, fm.Point(0, 0), fm.Point(2, 4))).result()
    assert point == fm.Point(1.0, 2.0) and isinstance(point, fm.Point)
    with pytest.raises(shoal.RemoteError) as raised:
        await (await fm.fail.async_submit(client, "no thanks")).result()
    assert raised.value.remote_type == f"{MODULE}.Refused"
    assert raised.value.remote_message == "no thanks"
    assert "raise Refused(why)" in raised.value.remote_traceback
    assert "node/functions" not in raised.value.remote_traceback  # the function's frames only
    # Arguments that do not fit the type hints fail the task, not the worker.
    bad = task_pb2.TaskSpec(function=task_pb2.FunctionSpec(name=f"{MODULE}:add", args='["x", 1]'))
    failed = await client.wait((await client.submit(bad)).id)
    assert failed.state == task_pb2.TASK_STATE_FAILED and "valid integer" in failed.result.error
    assert not failed.result.infrastructure_failure
    assert await (await fm.add.async_submit(client, 1, 1)).result() == 2
    # In one call: submitted, waited for, decoded.
    assert await fm.midpoint.async_call(client, fm.Point(0, 0), fm.Point(4, 2)) == fm.Point(2, 1)
    with pytest.raises(shoal.RemoteError):
        await fm.fail.async_call(client, "again")

    def blocking() -> int:
        with shoal.Client(mesh.address, token=mesh.token) as sync:
            return fm.add.call(sync, 40, 2)

    assert await asyncio.to_thread(blocking) == 42


async def test_handles_as_arguments_make_a_dag(mesh: Mesh) -> None:
    client = mesh.client
    a = await fm.square.async_submit(client, 3)
    b = await fm.square.async_submit(client, 4)
    both = await fm.add.async_submit(client, a, b=b)
    assert await both.result() == 25
    assert set((await both.task()).depends_on) == {a.task_id, b.task_id}
    # Handles inside a list, and in a dataclass's fields: each result arrives in its place.
    assert await (await fm.total.async_submit(client, [a, b, 1])).result() == 26
    middle = await fm.midpoint.async_submit(client, fm.Point(a, 0), fm.Point(b, 2))  # type: ignore[arg-type]
    assert await middle.result() == fm.Point(12.5, 1.0)
    # An upstream that fails skips what depends on it.
    broken = await fm.fail.async_submit(client, "upstream")
    after = await fm.add.async_submit(client, broken, 1)
    with pytest.raises(TaskFailed) as skipped:
        await after.result()
    assert skipped.value.task.state == task_pb2.TASK_STATE_SKIPPED


async def test_map_over_more_inputs_than_one_batch_holds(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(slots=4, imports=[MODULE])
    count = MAP_BATCH + 2_000  # two SubmitBatch calls

    def blocking() -> list[int]:  # the blocking Client, off the loop that serves the mesh
        with shoal.Client(mesh.address, token=mesh.token) as client:
            handles = fm.square.map(client, range(count))
            assert len(handles) == count
            assert fm.add.submit(client, handles[2], handles[3]).result() == 13
            return shoal.gather(handles)

    assert await asyncio.to_thread(blocking) == [i * i for i in range(count)]


def _reads(path: Path, text: str) -> Callable[[], None]:
    """A check (for `eventually`) that `path` holds `text`."""

    def check() -> None:
        assert path.read_text() == text

    return check


async def test_cancel_timeout_and_retry(mesh: Mesh, tmp_path: Path) -> None:
    client = mesh.client
    marker = tmp_path / "cancelled"
    waiting = await fm.wait_async.async_submit(client, 60, str(marker))
    # Running in its worker (a call cancelled before its worker starts it is dropped).
    await eventually(_reads(marker, "started"), retry_on=(OSError, AssertionError))
    await waiting.cancel()
    done = await client.wait(waiting.task_id)
    assert done.state == task_pb2.TASK_STATE_CANCELLED
    # CancelledError reached the function.
    await eventually(_reads(marker, "cancelled"), retry_on=(OSError, AssertionError))

    shut = fm.Gate(tmp_path / "never")  # never opened: only the worker's end ends the call
    stuck = await fm.wait_sync.async_submit(client, str(shut))  # its worker is replaced
    await _running(mesh, stuck.task_id)
    await stuck.cancel()
    assert (await client.wait(stuck.task_id)).state == task_pb2.TASK_STATE_CANCELLED

    slow = await fm.too_slow.async_submit(client)
    assert (await client.wait(slow.task_id)).state == task_pb2.TASK_STATE_TIMED_OUT

    assert await (await fm.flaky.async_submit(client, str(tmp_path / "count"))).result() == 3
    # Both slots still serve calls.
    assert await asyncio.gather(
        *[(await fm.add.async_submit(client, i, 1)).result() for i in range(4)]
    ) == [1, 2, 3, 4]


async def test_a_worker_killed_mid_call_fails_only_its_attempt(mesh: Mesh, tmp_path: Path) -> None:
    client = mesh.client
    gate = fm.Gate(tmp_path / "gate")
    doomed = await fm.pid_after.async_submit(client, str(gate))
    pid_file = Path(f"{gate}.pid")
    pid = int(await eventually(lambda: pid_file.read_text(), retry_on=(OSError, ValueError)))
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(TaskFailed) as failed:
        await doomed.result()
    assert not isinstance(failed.value, shoal.RemoteError)
    assert "worker process died" in failed.value.task.result.error
    assert not failed.value.task.result.infrastructure_failure  # not the node's fault
    gate.open()
    pids = {await (await fm.pid_after.async_submit(client, str(gate))).result() for _ in range(4)}
    assert pid not in pids  # replaced
    [status] = await client.nodes()  # no circuit breaker counts the crash against the node
    assert all(b.failures == 0 for b in status.breakers)


async def test_the_cli_runs_and_submits_a_function_call(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`shoal run --function PATH --input ARGS` prints what the function printed, then what it
    returned (JSON), as `shoal get` shows it; a failure exits 1 with its error; bad input
    changes nothing."""
    monkeypatch.setenv("SHOAL_TOKEN_FILE", str(mesh.data_dir / ADMIN_TOKEN_FILE))
    shoal_cli = [str(BIN / "shoal")]
    address = ["-c", mesh.address]
    added = await run_tool(
        [*shoal_cli, "run", *address, "--function", f"{MODULE}:add", "--input", "[2, 3]"]
    )
    assert (added.returncode, added.stdout) == (0, "5\n"), added
    greeted = await run_tool(
        [*shoal_cli, "run", *address, "--function", f"{MODULE}:greet", "--input", '{"name": "ada"}']
    )
    assert greeted.returncode == 0 and greeted.stdout.endswith('"hello ada!"\n'), greeted
    failed = await run_tool(
        [*shoal_cli, "run", *address, "--function", f"{MODULE}:fail", "--input", '["no"]']
    )
    assert failed.returncode == 1 and "Refused: no" in failed.stderr, failed
    submitted = await run_tool(
        [*shoal_cli, "submit", *address, "--function", f"{MODULE}:square", "--input", "[7]"]
    )
    assert submitted.returncode == 0, submitted
    assert fm.square.outcome(await mesh.client.wait(submitted.stdout.strip())) == 49
    shown = await run_tool([*shoal_cli, "get", *address, submitted.stdout.strip()])
    assert shown.returncode == 0 and "returned" in shown.stdout, shown
    assert shown.stdout.split("returned", 1)[1].split()[0] == "49", shown
    before = len(await mesh.client.list())
    for bad in (["--input", '{"x": NaN}'], ["--input", "7"], ["--python", "pass"]):
        refused = await run_tool([*shoal_cli, "run", *address, "--function", f"{MODULE}:add", *bad])
        assert refused.returncode == 2, refused
    refused = await run_tool([*shoal_cli, "run", *address, "--function", "not a path"])
    assert refused.returncode == 2 and "not an import path" in refused.stderr, refused
    assert len(await mesh.client.list()) == before


async def test_grpcurl_calls_a_function_with_its_arguments_as_json_text(
    mesh: Mesh, grpcurl: Path
) -> None:
    token = (mesh.data_dir / ADMIN_TOKEN_FILE).read_text().strip()

    async def submit(function: dict[str, str]) -> dict[str, Any]:
        done = await grpcurl_call(
            grpcurl,
            mesh.address,
            "shoal.v1.Tasks/Submit",
            {"spec": {"function": function}, "wait": True},
            token=token,
        )
        return ok_json(done)

    added = await submit({"name": f"{MODULE}:add", "args": "[2, 3]"})
    assert added["task"]["result"]["output"] == {"value": "5"}, added
    greeted = await submit({"name": f"{MODULE}:greet", "kwargs": '{"name": "ada"}'})
    assert greeted["task"]["result"]["output"] == {"value": '"hello ada!"'}, greeted
    refused = await grpcurl_call(
        grpcurl,
        mesh.address,
        "shoal.v1.Tasks/Submit",
        {"spec": {"function": {"name": f"{MODULE}:add", "args": '{"a": 2}'}}},
        token=token,
    )
    assert refused.returncode != 0 and "must be a JSON array" in refused.stderr, refused


async def test_a_node_without_the_module_never_receives_its_functions(mesh: Mesh) -> None:
    other = await mesh.start_node(
        slots=2, node_id="elsewhere", imports=["tests.integration.functions_elsewhere"]
    )
    assert other.info().functions == ["tests.integration.functions_elsewhere:elsewhere"]
    handles = [await fm.add.async_submit(mesh.client, i, i) for i in range(20)]
    assert await shoal.async_gather(handles) == [2 * i for i in range(20)]
    for h in handles:
        assert (await h.task()).node_id == mesh.node.node_id


async def test_a_node_killed_takes_its_workers_with_it(
    mesh: Mesh, cli: CliProcesses, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # SIGKILL: nothing of the node runs after it, and a worker busy importing (or in a call)
    # does not read the pipe that would tell it.
    monkeypatch.setenv("SHOAL_NODE_TOKEN_FILE", str(mesh.data_dir / ADMIN_TOKEN_FILE))
    gate = fm.Gate(tmp_path / "gate")  # shut: the workers' import waits at it
    monkeypatch.setenv(fm.STUCK_GATE, str(gate))
    stuck = "tests.integration.functions_stuck"
    node = await cli.start(
        "node", "-c", mesh.address, "--node-id", "doomed", "--slots", "2", "--import", stuck
    )

    def workers() -> list[psutil.Process]:
        found = [
            p
            for p in psutil.Process(node.proc.pid).children()
            if "shoal.node.functions.worker" in p.cmdline()
        ]
        assert len(found) == 2
        return found

    try:
        held = await eventually(workers, timeout=60, retry_on=(AssertionError, psutil.Error))
        node.proc.kill()
        await node.proc.wait()
        _, alive = await asyncio.to_thread(psutil.wait_procs, held, 10)
        assert not alive
    finally:
        gate.open()
