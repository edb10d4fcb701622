"""The SDK against an in-process coordinator and node over real loopback channels."""

from __future__ import annotations

import contextlib
import functools
import gc
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from shoal import InvalidArgument, ResourceExhausted, WaitTimeout, noop, python, shell
from shoal.specs import FINAL_STATES, is_final
from shoal.v1 import task_pb2, tasks_pb2, tasks_pb2_grpc

from .harness import Mesh, MeshFactory, eventually, gate_script, process_gone

pytestmark = pytest.mark.timeout(30)

WAIT = timedelta(seconds=15)


async def running(mesh: Mesh, task_id: str) -> task_pb2.Task:
    """The task once its node reports it started."""

    async def started() -> task_pb2.Task:
        task = await mesh.client.get(task_id)
        assert task.state == task_pb2.TASK_STATE_RUNNING, task_pb2.TaskState.Name(task.state)
        return task

    return await eventually(started)


async def test_shell_task_submit_wait_get(mesh: Mesh) -> None:
    submitted = await mesh.client.submit(shell(["echo", "hello"], name="greet"))

    done = await mesh.client.wait(submitted.id, timeout=WAIT)
    got = await mesh.client.get(submitted.id)

    assert submitted.id
    assert submitted.spec.name == "greet"
    assert done.state == task_pb2.TASK_STATE_SUCCEEDED
    assert done.result.stdout == "hello\n"
    assert done.result.exit_code == 0
    assert done.node_id == mesh.node.node_id
    assert done.attempt.number == 1
    assert got == done
    assert done.created_at.ToNanoseconds() <= done.started_at.ToNanoseconds()
    assert done.started_at.ToNanoseconds() <= done.finished_at.ToNanoseconds()


async def test_shell_script_reads_env_and_stdin(mesh: Mesh) -> None:
    spec = shell('read line; echo "$GREETING $line"', env={"GREETING": "hi"}, stdin=b"shoal\n")

    done = await mesh.client.wait((await mesh.client.submit(spec)).id, timeout=WAIT)

    assert done.state == task_pb2.TASK_STATE_SUCCEEDED
    assert done.result.stdout == "hi shoal\n"


async def test_python_task(mesh: Mesh) -> None:
    spec = python("import sys; print(sum(range(10)), sys.argv[1:])", args=["a", "b"])

    done = await mesh.client.wait((await mesh.client.submit(spec)).id, timeout=WAIT)

    assert done.state == task_pb2.TASK_STATE_SUCCEEDED
    assert done.result.stdout == "45 ['a', 'b']\n"


async def test_noop_task_echoes_params(mesh: Mesh) -> None:
    done = await mesh.client.wait((await mesh.client.submit(noop({"answer": 42}))).id, timeout=WAIT)

    assert done.state == task_pb2.TASK_STATE_SUCCEEDED
    assert dict(done.result.output) == {"answer": 42}


async def test_failing_exit_code_is_failed(mesh: Mesh) -> None:
    done = await mesh.client.wait(
        (await mesh.client.submit(shell("echo oops >&2; exit 7"))).id, timeout=WAIT
    )

    assert done.state == task_pb2.TASK_STATE_FAILED
    assert done.result.exit_code == 7
    assert done.result.stderr == "oops\n"
    assert not done.result.infrastructure_failure


async def test_missing_command_fails_with_127(mesh: Mesh) -> None:
    done = await mesh.client.wait(
        (await mesh.client.submit(shell(["/nonexistent/shoal-command"]))).id, timeout=WAIT
    )

    assert done.state == task_pb2.TASK_STATE_FAILED
    assert done.result.exit_code == 127
    assert "/nonexistent/shoal-command" in done.result.error


async def test_cancel_running_task_kills_its_process_group(mesh: Mesh, tmp_path: Path) -> None:
    shell_pid, child_pid = tmp_path / "shell.pid", tmp_path / "child.pid"
    script = (
        f"echo $$ > {shell_pid}.tmp && mv {shell_pid}.tmp {shell_pid}; "
        f"sleep 30 & echo $! > {child_pid}.tmp && mv {child_pid}.tmp {child_pid}; wait"
    )
    task = await mesh.client.submit(shell(script))
    await running(mesh, task.id)
    pids = await eventually(
        lambda: [int(shell_pid.read_text()), int(child_pid.read_text())],
        retry_on=(FileNotFoundError,),
    )
    for pid in pids:
        with pytest.raises(AssertionError):
            process_gone(pid)  # both run before the cancel

    cancelled = await mesh.client.cancel(task.id)
    done = await mesh.client.wait(task.id, timeout=WAIT)

    assert cancelled.id == task.id
    assert done.state == task_pb2.TASK_STATE_CANCELLED
    for pid in pids:
        await eventually(functools.partial(process_gone, pid), timeout=15)
    assert mesh.node.running == 0


async def test_cancel_queued_task_is_cancelled_at_once(
    mesh_factory: MeshFactory, tmp_path: Path
) -> None:
    mesh = await mesh_factory(slots=1)
    gate = tmp_path / "gate"
    blocker = await mesh.client.submit(shell(gate_script(gate)))
    await running(mesh, blocker.id)
    queued = await mesh.client.submit(shell(["echo", "never"]))

    cancelled = await mesh.client.cancel(queued.id)
    gate.touch()
    await mesh.client.wait(blocker.id, timeout=WAIT)

    assert cancelled.state == task_pb2.TASK_STATE_CANCELLED
    final = await mesh.client.get(queued.id)
    assert final.state == task_pb2.TASK_STATE_CANCELLED
    assert not final.node_id  # it never ran


async def test_execution_timeout_is_timed_out(mesh: Mesh) -> None:
    task = await mesh.client.submit(shell(["sleep", "30"], timeout=timedelta(milliseconds=300)))

    done = await mesh.client.wait(task.id, timeout=WAIT)

    assert done.state == task_pb2.TASK_STATE_TIMED_OUT
    assert "timed out" in done.result.error


async def test_a_stopped_task_keeps_the_end_of_its_output(mesh: Mesh) -> None:
    """What a task wrote before it timed out or was cancelled says where it was."""
    script = "echo step 1; echo warned >&2; sleep 30"
    timed = await mesh.client.submit(shell(script, timeout=timedelta(seconds=1)))
    cancelled = await mesh.client.submit(shell(script))
    since = cancelled.created_seq - 1
    async for event in mesh.client.watch(since=since, task_ids=[cancelled.id], output=True):
        if event.HasField("output") and event.output.stream == task_pb2.OUTPUT_STREAM_STDERR:
            break  # it has written both
    await mesh.client.cancel(cancelled.id)

    for task, state in (
        (timed, task_pb2.TASK_STATE_TIMED_OUT),
        (cancelled, task_pb2.TASK_STATE_CANCELLED),
    ):
        done = await mesh.client.wait(task.id, timeout=WAIT)
        assert done.state == state, done
        assert (done.result.stdout, done.result.stderr) == ("step 1\n", "warned\n")


async def test_cancel_and_timeout_leave_no_unretrieved_errors(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    """Killing a task must not leave a failed future for asyncio to complain about."""
    cancelled = await mesh.client.submit(shell(["sleep", "30"]))
    timed_out = await mesh.client.submit(shell(["sleep", "30"], timeout=timedelta(seconds=0.2)))
    await running(mesh, cancelled.id)
    await mesh.client.cancel(cancelled.id)

    states = {(await mesh.client.wait(t.id, timeout=WAIT)).state for t in (cancelled, timed_out)}
    gc.collect()  # "never retrieved" is reported when the future is collected

    assert states == {task_pb2.TASK_STATE_CANCELLED, task_pb2.TASK_STATE_TIMED_OUT}
    unretrieved = [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]
    assert unretrieved == []


async def test_a_watch_of_final_states_sees_one_outcome_per_task(mesh: Mesh) -> None:
    first = await mesh.client.submit(shell("echo ok"))
    failing = await mesh.client.submit(shell("echo no >&2; exit 3"))
    outcomes: list[task_pb2.Event] = []
    watch = mesh.client.watch(since=first.created_seq - 1, states=FINAL_STATES, output=True)
    async with contextlib.aclosing(watch):
        async for event in watch:
            outcomes.append(event)
            if len(outcomes) == 2:
                break
    assert sorted((e.task_id, e.state) for e in outcomes) == sorted(
        [(first.id, task_pb2.TASK_STATE_SUCCEEDED), (failing.id, task_pb2.TASK_STATE_FAILED)]
    )
    assert all(not e.HasField("output") and e.HasField("result") for e in outcomes)


async def test_watch_sees_output_then_the_final_event_in_order(mesh: Mesh) -> None:
    task = await mesh.client.submit(shell("echo one; echo two >&2; echo three"))

    events: list[task_pb2.Event] = []
    watch = mesh.client.watch(since=task.created_seq - 1, task_ids=[task.id], output=True)
    async with contextlib.aclosing(watch):
        async for event in watch:
            events.append(event)
            if is_final(event.state) and not event.HasField("output"):
                break

    seqs = [e.seq for e in events]
    assert seqs == sorted(set(seqs)), "seq must strictly increase"
    assert all(e.task_id == task.id for e in events)
    assert events[0].seq == task.created_seq
    assert events[0].state == task_pb2.TASK_STATE_QUEUED
    states = [e.state for e in events if not e.HasField("output")]
    assert states == [
        task_pb2.TASK_STATE_QUEUED,
        task_pb2.TASK_STATE_ASSIGNED,
        task_pb2.TASK_STATE_RUNNING,
        task_pb2.TASK_STATE_SUCCEEDED,
    ]
    outputs = [e for e in events if e.HasField("output")]
    stdout = "".join(
        e.output.data for e in outputs if e.output.stream == task_pb2.OUTPUT_STREAM_STDOUT
    )
    stderr = "".join(
        e.output.data for e in outputs if e.output.stream == task_pb2.OUTPUT_STREAM_STDERR
    )
    assert stdout == "one\nthree\n"
    assert stderr == "two\n"
    final = events[-1]
    assert not final.HasField("output")
    assert all(e.seq < final.seq for e in outputs)
    assert final.result.stdout == "one\nthree\n"
    assert final.node_id == mesh.node.node_id


async def test_run_follows_a_task_to_its_end(mesh: Mesh) -> None:
    events = [e async for e in mesh.client.run(shell(["echo", "ran"]))]

    assert events[-1].state == task_pb2.TASK_STATE_SUCCEEDED
    assert "".join(e.output.data for e in events if e.HasField("output")) == "ran\n"


async def test_idempotency_key_returns_the_existing_task(mesh: Mesh) -> None:
    spec = shell(["echo", "once"], idempotency_key="job-42")

    first = await mesh.client.submit(spec)
    again = await mesh.client.submit(spec)
    (in_batch,) = await mesh.client.submit_batch([spec])
    auth = (("authorization", f"Bearer {mesh.token}"),)
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        stub = tasks_pb2_grpc.TasksStub(channel)
        raw = await stub.Submit(tasks_pb2.SubmitRequest(spec=spec), metadata=auth)
        raw_batch = await stub.SubmitBatch(
            tasks_pb2.SubmitBatchRequest(specs=[spec, shell(["echo", "new"])]), metadata=auth
        )

    assert again.id == first.id
    assert in_batch == first.id
    assert raw.task.id == first.id and raw.created is False
    assert raw_batch.task_ids[0] == first.id
    assert list(raw_batch.created) == [False, True]
    await mesh.client.wait(raw_batch.task_ids[1], timeout=WAIT)
    done = await mesh.client.wait(first.id, timeout=WAIT)
    assert done.result.stdout == "once\n"
    assert len(await mesh.client.list()) == 2  # the keyed task once, plus "new"


async def test_task_for_an_executor_no_node_has_waits_when_it_asks_to(mesh: Mesh) -> None:
    spec = task_pb2.TaskSpec(custom=task_pb2.CustomSpec(executor="quantum"), wait_for_node=True)

    task = await mesh.client.submit(spec)
    with pytest.raises(WaitTimeout) as waited:
        await mesh.client.wait(task.id, timeout=timedelta(milliseconds=300))
    later = waited.value.task

    for seen in (task, later, await mesh.client.get(task.id)):
        assert seen.state == task_pb2.TASK_STATE_QUEUED
        assert "quantum" in seen.pending_reason
        assert not seen.node_id
    # A placeable task behind it is not held up.
    done = await mesh.client.wait((await mesh.client.submit(shell(["true"]))).id, timeout=WAIT)
    assert done.state == task_pb2.TASK_STATE_SUCCEEDED


def _negative_timeout() -> task_pb2.TaskSpec:
    spec = shell(["true"])
    spec.timeout.FromTimedelta(timedelta(seconds=-1))
    return spec


@pytest.mark.parametrize(
    ("spec", "error", "field"),
    [
        pytest.param(task_pb2.TaskSpec(name="no kind"), InvalidArgument, "spec.kind", id="no-kind"),
        pytest.param(shell(""), InvalidArgument, "spec.shell", id="empty-script"),
        pytest.param(shell([]), InvalidArgument, "spec.shell", id="empty-argv"),
        pytest.param(python("  "), InvalidArgument, "spec.python.code", id="empty-code"),
        pytest.param(_negative_timeout(), InvalidArgument, "spec.timeout", id="negative-timeout"),
        pytest.param(
            shell(["echo", "x" * ((1 << 20) + 1)]), ResourceExhausted, "spec", id="oversize"
        ),
    ],
)
async def test_bad_input_is_refused_and_nothing_is_stored(
    mesh: Mesh,
    spec: task_pb2.TaskSpec,
    error: type[InvalidArgument | ResourceExhausted],
    field: str,
) -> None:
    with pytest.raises(error) as single:
        await mesh.client.submit(spec)
    with pytest.raises(error) as batch:
        await mesh.client.submit_batch([shell(["echo", "fine"]), spec])

    one, many = single.value, batch.value
    assert isinstance(one, InvalidArgument | ResourceExhausted)
    assert isinstance(many, InvalidArgument | ResourceExhausted)
    assert [v.field for v in one.violations] == [field]
    assert [v.field for v in many.violations] == [field.replace("spec", "specs[1]", 1)]
    assert all(v.description for v in one.violations)
    assert await mesh.client.list() == []  # the good spec of the batch was not stored either


async def test_every_violation_of_a_batch_is_named(mesh: Mesh) -> None:
    with pytest.raises(InvalidArgument) as refused:
        await mesh.client.submit_batch(
            [task_pb2.TaskSpec(), shell(["true"]), shell(""), _negative_timeout()]
        )

    assert [v.field for v in refused.value.violations] == [
        "specs[0].kind",
        "specs[2].shell",
        "specs[3].timeout",
    ]
    assert await mesh.client.list() == []


async def test_critical_runs_before_low_on_a_busy_node(
    mesh_factory: MeshFactory, tmp_path: Path
) -> None:
    mesh = await mesh_factory(slots=1)
    gate = tmp_path / "gate"
    blocker = await mesh.client.submit(shell(gate_script(gate)))
    await running(mesh, blocker.id)

    low = await mesh.client.submit(shell(["echo", "low"], priority="low"))
    critical = await mesh.client.submit(shell(["echo", "critical"], priority="critical"))
    for waiting in (low, critical):
        assert waiting.state == task_pb2.TASK_STATE_QUEUED
        assert waiting.pending_reason.startswith("waiting for a free slot")
    gate.touch()
    low_done = await mesh.client.wait(low.id, timeout=WAIT)
    critical_done = await mesh.client.wait(critical.id, timeout=WAIT)

    assert low_done.state == critical_done.state == task_pb2.TASK_STATE_SUCCEEDED
    assert critical_done.started_at.ToNanoseconds() < low_done.started_at.ToNanoseconds()
    assert critical_done.finished_at.ToNanoseconds() <= low_done.started_at.ToNanoseconds()


async def test_list_and_nodes(mesh: Mesh) -> None:
    ids = await mesh.client.submit_batch([shell(["echo", str(i)]) for i in range(5)])
    for task_id in ids:
        await mesh.client.wait(task_id, timeout=WAIT)

    listed = await mesh.client.list()
    succeeded = await mesh.client.list(states=[task_pb2.TASK_STATE_SUCCEEDED], limit=3)
    nodes = await mesh.client.nodes()

    assert [t.id for t in listed] == ids[::-1]  # newest first
    assert [t.id for t in succeeded] == ids[:1:-1]
    assert [n.info.node_id for n in nodes] == [mesh.node.node_id]
    assert nodes[0].connected
    assert nodes[0].info.slots == 4
