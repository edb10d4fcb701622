"""The `shoal` command as a new user meets it: real processes against a real coordinator."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import shoal
from shoal import noop, shell
from shoal.cli.render import event_line
from shoal.config import ADMIN_TOKEN_FILE
from shoal.v1 import admin_pb2, task_pb2

from . import functions_module as fm
from .harness import (
    BIN,
    CliProcess,
    CliProcesses,
    Completed,
    Mesh,
    MeshFactory,
    eventually,
    free_port,
    run_tool,
)

pytestmark = pytest.mark.timeout(90)

WAIT = timedelta(seconds=20)


@pytest.fixture
def mesh_cli(mesh: Mesh, cli: CliProcesses, monkeypatch: pytest.MonkeyPatch) -> CliProcesses:
    """CLI processes that find the in-process mesh's admin token."""
    monkeypatch.setenv("SHOAL_TOKEN_FILE", str(mesh.data_dir / ADMIN_TOKEN_FILE))
    return cli


async def shoal_(cli: CliProcesses, *args: str) -> Completed:
    """Run `shoal ARGS...` to its end."""
    run = await cli.start(*args, pipe=True)
    out, err = await asyncio.wait_for(run.proc.communicate(), 60)
    assert run.proc.returncode is not None
    return Completed(run.proc.returncode, out.decode(), err.decode())


def words(text: str) -> str:
    """`text` with every run of whitespace as one space: help and tables wrap lines."""
    return " ".join(text.split())


async def test_submit_wait_exits_1_unless_every_task_succeeded(
    mesh: Mesh, mesh_cli: CliProcesses
) -> None:
    failed = await shoal_(
        mesh_cli, "submit", "-c", mesh.address, "--count", "2", "--wait", "--", "sh", "-c", "exit 2"
    )
    assert failed.returncode == 1, failed
    *each, total = failed.stdout.splitlines()  # each failed task's id and state, then counts
    assert [line.split()[1] for line in each] == ["FAILED", "FAILED"] and total == "2 FAILED"

    fine = await shoal_(mesh_cli, "submit", "-c", mesh.address, "--wait", "--", "true")
    assert fine.returncode == 0, fine
    (line,) = fine.stdout.splitlines()  # one task: its id and how it ended, as `wait` says
    task_id, state = line.split()
    assert state == "SUCCEEDED" and (await mesh.client.get(task_id)).id == task_id


async def test_ctrl_c_on_submit_wait_says_which_tasks_go_on(
    mesh: Mesh, mesh_cli: CliProcesses
) -> None:
    run = await mesh_cli.start(
        "submit", "-c", mesh.address, "--wait", "--", "sleep", "30", pipe=True
    )
    assert run.proc.stderr is not None
    said = (await asyncio.wait_for(run.proc.stderr.readline(), 30)).decode().split()
    assert said[0] == "task", said  # its id, before it waits
    run.proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(run.proc.communicate(), 30)
    assert run.proc.returncode == 130
    assert out.decode().split() == [said[1]] and "1 task(s) go on" in words(err.decode())
    assert (await mesh.client.get(said[1])).state == task_pb2.TASK_STATE_RUNNING
    await mesh.client.cancel(said[1])


async def test_cancel_says_how_the_task_ended(mesh: Mesh, mesh_cli: CliProcesses) -> None:
    running = await mesh.client.submit(shell(["sleep", "30"]))

    async def started() -> bool:
        return (await mesh.client.get(running.id)).state == task_pb2.TASK_STATE_RUNNING

    await eventually(started)
    stopped = await shoal_(mesh_cli, "cancel", running.id, "-c", mesh.address)
    assert (stopped.returncode, stopped.stdout.split()) == (0, [running.id, "CANCELLED"]), stopped

    done = await mesh.client.execute(shell(["true"]))
    late = await shoal_(mesh_cli, "cancel", done.id, "-c", mesh.address)
    assert words(late.stdout) == f"{done.id} SUCCEEDED (it had ended: nothing to cancel)"


async def test_help_keeps_its_bracketed_notes_and_there_is_a_version(cli: CliProcesses) -> None:
    ls_help = await shoal_(cli, "ls", "--help")
    assert "Coordinator address [env SHOAL_COORDINATOR]" in words(ls_help.stdout)
    node_help = words((await shoal_(cli, "node", "--help")).stdout)
    assert "as advertised on mDNS [default: default]" in node_help
    assert "File holding this node's token [env SHOAL_NODE_TOKEN]" in node_help

    version = await shoal_(cli, "--version")
    assert (version.returncode, version.stdout) == (0, f"shoal {shoal.__version__}\n")


async def test_a_node_token_is_offered_as_shoal_node_token(
    mesh: Mesh, mesh_cli: CliProcesses
) -> None:
    node = await shoal_(mesh_cli, "token", "create", "gpu-1", "--role", "node", "-c", mesh.address)
    assert node.returncode == 0, node
    assert "SHOAL_NODE_TOKEN=..." in node.stderr
    submitter = await shoal_(mesh_cli, "token", "create", "ci", "-c", mesh.address)
    assert "SHOAL_TOKEN=..." in submitter.stderr and "NODE" not in submitter.stderr


async def test_every_listing_prints_json(mesh: Mesh, mesh_cli: CliProcesses) -> None:
    client = mesh.client
    done = await client.wait((await client.submit(shell(["true"]))).id, timeout=WAIT)
    await client.set_quota(admin_pb2.Quota(key="team:ml", concurrency=2))
    await client.create_token(admin_pb2.CreateTokenRequest(name="ci", role=admin_pb2.ROLE_READER))
    await client.create_schedule(
        admin_pb2.Schedule(name="nightly", cron="0 3 * * *", spec=shell(["true"]))
    )

    async def listed(*args: str) -> list[dict[str, object]]:
        result = await shoal_(mesh_cli, *args, "-c", mesh.address, "--json")
        assert result.returncode == 0, result
        data = json.loads(result.stdout)
        assert isinstance(data, list)
        return data

    assert [t["id"] for t in await listed("ls")] == [done.id]
    assert [n["info"]["nodeId"] for n in await listed("nodes")] == [mesh.node.node_id]  # type: ignore[index]
    assert [q["key"] for q in await listed("quota", "ls")] == ["team:ml"]
    assert "ci" in [t["name"] for t in await listed("token", "ls")]
    assert [s["name"] for s in await listed("schedule", "ls")] == ["nightly"]
    usage = {(u["key"], len(str(u["period"]))): u for u in await listed("usage")}
    assert usage["executor:shell", len("2026-01-01")]["requests"] == "1"  # int64: a string


async def test_submit_file_takes_one_spec_or_a_list(
    mesh: Mesh, mesh_cli: CliProcesses, tmp_path: Path
) -> None:
    one, many, bad = tmp_path / "one.json", tmp_path / "many.json", tmp_path / "bad.json"
    one.write_text(json.dumps({"shell": {"argv": ["echo", "one"]}}))
    many.write_text(json.dumps([{"shell": {"argv": ["echo", str(i)]}} for i in range(2)]))
    bad.write_text("[3]")

    single = await shoal_(mesh_cli, "submit", "-c", mesh.address, "--file", str(one))
    assert single.returncode == 0, single
    (task_id,) = single.stdout.split()
    assert (await mesh.client.wait(task_id, timeout=WAIT)).result.stdout == "one\n"
    listed = await shoal_(mesh_cli, "submit", "-c", mesh.address, "--file", str(many))
    assert listed.returncode == 0 and len(listed.stdout.split()) == 2, listed

    refused = await shoal_(mesh_cli, "submit", "-c", mesh.address, "--file", str(bad))
    assert refused.returncode == 2
    assert f"{bad} [0]: expected a TaskSpec object (or a list of them), got int" in words(
        refused.stderr
    )
    assert len(await mesh.client.list()) == 3  # the refused file submitted nothing


async def test_an_empty_token_file_variable_counts_as_unset(
    mesh: Mesh, cli: CliProcesses, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Unset, the CLI uses the local admin token, as on the coordinator's own machine.
    local = Path(os.environ["XDG_DATA_HOME"]) / "shoal" / ADMIN_TOKEN_FILE
    local.parent.mkdir(parents=True)
    local.write_text(mesh.token)
    monkeypatch.setenv("SHOAL_TOKEN_FILE", "")

    listed = await shoal_(cli, "ls", "-c", mesh.address)

    assert listed.returncode == 0, listed


async def test_get_shows_an_exit_code_only_for_a_task_that_ran(
    mesh: Mesh, mesh_cli: CliProcesses
) -> None:
    ran = await mesh.client.wait((await mesh.client.submit(shell("exit 3"))).id, timeout=WAIT)
    later = datetime.now(UTC) + timedelta(hours=1)
    never = await mesh.client.cancel((await mesh.client.submit(shell("true", not_before=later))).id)
    assert never.state == task_pb2.TASK_STATE_CANCELLED

    shown = await shoal_(mesh_cli, "get", ran.id, "-c", mesh.address)
    assert "exit code 3" in words(shown.stdout)
    shown = await shoal_(mesh_cli, "get", never.id, "-c", mesh.address)
    assert "CANCELLED" in shown.stdout and "exit code" not in shown.stdout
    listed = await shoal_(mesh_cli, "ls", "-c", mesh.address)
    assert "CANCELLED 0" not in words(listed.stdout)


async def test_watch_names_quota_notices(mesh: Mesh, mesh_cli: CliProcesses) -> None:
    await mesh.client.set_quota(admin_pb2.Quota(key="once", requests_per_day=1))
    first, _ = await mesh.client.submit_batch([noop(quota_keys=["once"])] * 2)
    await mesh.client.wait(first, timeout=WAIT)

    watch = await mesh_cli.start("watch", "-c", mesh.address, "--since", "0", pipe=True)
    line = await line_with(watch, "quota once")
    assert "quota once holds tasks back: 1 requests a day used by once" in line
    assert "UNSPECIFIED" not in line
    await watch.stop()


async def line_with(run: CliProcess, text: str) -> str:
    """The first line `run` prints that holds `text`."""
    assert run.proc.stdout is not None
    while True:
        line = (await asyncio.wait_for(run.proc.stdout.readline(), 20)).decode()
        assert line, "the process ended first"
        if text in line:
            return line


def test_watch_lines_for_node_and_breaker_notices() -> None:
    node = task_pb2.Event(
        seq=7,
        node=task_pb2.NodeNotice(
            node_id="n1",
            throttled=True,
            min_priority=task_pb2.PRIORITY_HIGH,
            paused=2,
            reason="cpu 93% > 70%",
        ),
    )
    assert event_line(node) == (
        "node n1 [yellow]throttled[/] (cpu 93% > 70%): takes HIGH or higher, 2 paused"
    )
    calm = task_pb2.Event(node=task_pb2.NodeNotice(node_id="n1"))
    assert event_line(calm) == "node n1 calm: takes every priority"
    breaker = task_pb2.Event(
        breaker=task_pb2.Breaker(key="node:n1", state=task_pb2.BREAKER_STATE_CLOSED)
    )
    assert event_line(breaker) == "breaker node:n1 closed (0 failures)"


async def test_a_wrong_address_is_named_at_once(
    cli: CliProcesses, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHOAL_TOKEN", "a-token")
    address = f"127.0.0.1:{free_port()}"
    listed = await shoal_(cli, "ls", "-c", address)
    assert listed.returncode == 1
    assert f"error: cannot reach a coordinator at {address}: " in listed.stderr


async def test_up_prints_a_command_the_user_can_type(
    cli: CliProcesses, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As after `make dev`: the venv's scripts are not on PATH.
    path = [p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != BIN]
    monkeypatch.setenv("PATH", os.pathsep.join(path))
    monkeypatch.delenv("SHOAL_TOKEN", raising=False)  # its data dir is not the default one:
    monkeypatch.delenv("SHOAL_TOKEN_FILE", raising=False)  # the command says where its token is
    port = free_port()
    up = await cli.start(
        "up", "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "data"), pipe=True
    )
    # The dashboard is served, on loopback: 7080 or the next free port.
    url = (await line_with(up, "dashboard: ")).split("dashboard: ", 1)[1].strip()
    assert url.startswith("http://127.0.0.1:") and 7080 <= int(url.split(":")[2][:-1]) < 7100
    line = await line_with(up, "try: ")
    command = line.split("try: ", 1)[1].split(";", 1)[0]
    assert f"run -c 127.0.0.1:{port} -- echo hello" in command

    ran = await run_tool(["sh", "-c", command])  # as typed in a shell

    assert (ran.returncode, ran.stdout) == (0, "hello\n"), ran
    page = await run_tool(["curl", "-sf", url])
    assert page.returncode == 0 and "<html" in page.stdout
    await up.stop()


async def test_up_imports_functions_and_a_refused_local_token_says_what_to_set(
    cli: CliProcesses, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SHOAL_TOKEN", raising=False)
    monkeypatch.delenv("SHOAL_TOKEN_FILE", raising=False)
    port, data = free_port(), tmp_path / "data"
    module = "tests.integration.functions_module"
    serve = ["--listen", f"127.0.0.1:{port}", "--data-dir", str(data), "--import", module]
    up = await cli.start("up", *serve, pipe=True)
    offered = await line_with(up, "functions ")
    assert f"{module}:add" in offered and f"{module}:square" in offered, offered
    call = ["run", "-c", f"127.0.0.1:{port}", "--function", f"{module}:add", "--input", "[2, 3]"]
    # Its own data dir holds its admin token: the one the CLI finds by itself is not it.
    refused = await shoal_(cli, *call)
    assert refused.returncode == 1 and "SHOAL_TOKEN_FILE" in refused.stderr, refused
    monkeypatch.setenv("SHOAL_TOKEN_FILE", str(data / "admin.token"))
    ran = await shoal_(cli, *call)
    assert (ran.returncode, ran.stdout.strip().splitlines()[-1]) == (0, "5"), ran
    await up.stop()


async def test_up_demo_runs_a_function_call_among_its_tasks(
    cli: CliProcesses, tmp_path: Path
) -> None:
    serve = ["--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(tmp_path / "data")]
    up = await cli.start("up", "--demo", *serve, pipe=True)
    row = words(await line_with(up, " area "))
    assert "SUCCEEDED" in row and row.split()[-2] == "42", row
    await up.stop()


async def test_make_run_takes_a_port() -> None:
    planned = await run_tool(["make", "-n", "run", "PORT=7171"])
    assert planned.returncode == 0, planned
    assert "shoal up --demo --listen 127.0.0.1:7171" in planned.stdout


async def test_submit_and_run_docker_http_and_tool_tasks(
    mesh: Mesh, mesh_cli: CliProcesses
) -> None:
    async def submitted(*args: str) -> task_pb2.TaskSpec:
        result = await shoal_(mesh_cli, "submit", "-c", mesh.address, *args)
        assert result.returncode == 0, result
        return (await mesh.client.get(result.stdout.strip())).spec

    spec = await submitted("--docker", "alpine:3", "--", "echo", "hi")
    assert (spec.docker.image, list(spec.docker.command)) == ("alpine:3", ["echo", "hi"])
    spec = await submitted("--http", "https://api.example.com/x", "--method", "POST")
    assert (spec.http.url, spec.http.method) == ("https://api.example.com/x", "POST")
    spec = await submitted("--tool", "slugify", "--input", '{"text": "Hello, World!"}')
    assert spec.tool.name == "slugify" and dict(spec.tool.input) == {"text": "Hello, World!"}

    ran = await shoal_(
        mesh_cli, "run", "-c", mesh.address, "--tool", "slugify", "--input", '{"text": "Hi there"}'
    )
    assert ran.returncode == 0, ran
    assert json.loads(ran.stdout) == {"slug": "hi-there"}

    refused = await shoal_(mesh_cli, "submit", "-c", mesh.address, "--tool", "x", "--input", "[]")
    assert refused.returncode == 2
    assert "--input: expected a JSON object, got list" in words(refused.stderr)


async def test_what_tasks_and_nodes_say_is_shown_as_they_say_it_not_as_markup(
    mesh_factory: MeshFactory, cli: CliProcesses, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A task's name, a function's error and a node's id could style or break the CLI's
    # tables and messages (rich markup) if it read them as markup.
    hostile = "[/x][b]y[/b]"
    mesh = await mesh_factory(
        slots=2, node_id="[/n]", imports=["tests.integration.functions_module"]
    )
    monkeypatch.setenv("SHOAL_TOKEN_FILE", str(mesh.data_dir / ADMIN_TOKEN_FILE))
    spec = fm.fail.options(name=hostile).spec(hostile)
    failed = await mesh.client.wait((await mesh.client.submit(spec)).id, timeout=WAIT)
    assert failed.state == task_pb2.TASK_STATE_FAILED and hostile in failed.result.error

    shown = await shoal_(cli, "get", failed.id, "-c", mesh.address)
    assert shown.returncode == 0, shown
    assert words(f"name {hostile}") in words(shown.stdout)
    assert hostile in words(shown.stdout.partition("error")[2]) and "[/n]" in shown.stdout
    listed = await shoal_(cli, "ls", "-c", mesh.address)
    assert listed.returncode == 0 and hostile in words(listed.stdout), listed
    nodes = await shoal_(cli, "nodes", "-c", mesh.address)
    assert nodes.returncode == 0 and "[/n]" in nodes.stdout, nodes
    assert "functions" in nodes.stdout and "--json)" in nodes.stdout, nodes  # the first few

    # An escape sequence in what a task says (a terminal's title, its screen cleared) is shown,
    # not sent to the terminal.
    spec = fm.fail.spec("\x1b]0;TITLE\x07\x1b[2J")
    failed = await mesh.client.wait((await mesh.client.submit(spec)).id, timeout=WAIT)
    shown = await shoal_(cli, "get", failed.id, "-c", mesh.address)
    assert shown.returncode == 0, shown
    table = shown.stdout.partition("\nstderr\n")[0]  # (its output, piped here, goes as it is)
    assert "\x1b" not in table and "\\x1b]0;TITLE\\x07\\x1b[2J" in table
