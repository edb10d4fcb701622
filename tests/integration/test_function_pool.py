"""The function executor's warm workers with calls pipelined: several calls of a fast function
share one worker; when it dies, only the call it ran fails and the others run elsewhere (also
when a child it forked holds its pipes); a call cancelled while queued never runs; output
printed at once beyond a frame arrives in pieces, and what its commands write on fd 1 and 2
is its output; workers run as the node's run_as user, as
batch processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from shoal._output import chunk_bytes, stdout_bytes
from shoal.config import NodeSettings
from shoal.node.executors.base import ExecutionContext, Outcome
from shoal.node.executors.function import FunctionExecutor
from shoal.node.executors.python import runs_python
from shoal.node.executors.taskuser import TASK_UID_BASE, TaskUsers
from shoal.node.functions import process, wire
from shoal.node.functions.call import BACKLOG, Call
from shoal.node.functions.pool import DEATHS
from shoal.v1 import task_pb2
from tests.integration import functions_module as fm
from tests.integration.harness import eventually

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def executor() -> AsyncIterator[FunctionExecutor]:
    ex = FunctionExecutor(NodeSettings(imports=["tests.integration.functions_module"], slots=3))
    assert await ex.async_available()
    try:
        yield ex
    finally:
        await ex.aclose()


def _ctx() -> ExecutionContext:
    return ExecutionContext(task_id="t", emit=lambda chunk: None, output_tail_bytes=4096)


async def _value(run: asyncio.Task[Outcome]) -> str:
    outcome = await run
    assert outcome.state == task_pb2.TASK_STATE_SUCCEEDED, outcome.result.error
    return outcome.result.output.fields["value"].string_value


async def _made_fast(ex: FunctionExecutor, gate: fm.Gate) -> None:
    """Calls of pid_after with its gate open: the pool learns that they are fast."""
    gate.open()
    ex._pool.fast_below = 10.0  # whatever the machine's load: fast
    for _ in range(4):
        await ex.run(fm.pid_after.spec(str(gate)), _ctx())
    assert ex._pool.fast(fm.pid_after.name)
    gate.shut()


async def test_a_dead_worker_fails_the_call_it_ran_and_resends_the_rest(
    executor: FunctionExecutor, tmp_path: Path
) -> None:
    gate = fm.Gate(tmp_path / "gate")
    await _made_fast(executor, gate)
    pid_file = Path(f"{gate}.pid")
    pid_file.unlink()  # noqa: ASYNC240
    # Started in one turn of the loop: one worker holds all three, and runs the first.
    runs = [
        asyncio.create_task(executor.run(fm.pid_after.spec(str(gate)), _ctx())) for _ in range(3)
    ]
    pid = int(await eventually(lambda: pid_file.read_text(), retry_on=(OSError, ValueError)))
    held = [w for w in executor._pool._all if w.held]
    assert [w.pid for w in held] == [pid] and len(held[0].held) == 3
    os.kill(pid, signal.SIGKILL)
    failed = await runs[0]
    assert failed.state == task_pb2.TASK_STATE_FAILED
    assert "worker process died" in failed.result.error
    gate.open()
    pids = {int(await _value(r)) for r in runs[1:]}
    assert pid not in pids  # the queued calls ran in another worker
    assert executor._pool.fast_held == 0


async def test_calls_answered_before_their_worker_died_keep_their_answers_and_run_once(
    executor: FunctionExecutor, tmp_path: Path
) -> None:
    """A worker sends its answers in batches: one that dies holds answers not sent yet, which
    its node finds in its ledger. Only the call it died in fails; none runs twice."""
    log = tmp_path / "ran"
    executor._pool.fast_below = 10.0  # whatever the machine's load: fast
    for _ in range(4):
        await executor.run(fm.record.spec(str(tmp_path / "warm"), 0), _ctx())
    xs = [*range(10), -1, *range(10, 20)]  # in one turn of the loop: to one worker, in order
    runs = [asyncio.create_task(executor.run(fm.record.spec(str(log), x), _ctx())) for x in xs]
    outcomes = await asyncio.gather(*runs)
    failed = [
        x for x, o in zip(xs, outcomes, strict=True) if o.state != task_pb2.TASK_STATE_SUCCEEDED
    ]
    assert failed == [-1]
    assert "exit 7" in outcomes[xs.index(-1)].result.error
    values = [o.result.output.fields["value"].string_value for o in outcomes]
    assert values[:10] == [str(x) for x in range(10)]
    ran = log.read_text().split()
    assert sorted(ran, key=int) == sorted(map(str, xs), key=int)  # each once


@pytest.mark.parametrize(
    "what", ["thread", "raw thread", "child", "grandchild", "stdout", "fd 1", "timer", "task"]
)
async def test_a_call_that_leaves_something_behind_ends_its_worker_after_it(
    executor: FunctionExecutor, what: str, tmp_path: Path
) -> None:
    """A thread, a child, a timer or a task still running, or its output replaced: the calls
    after it (of other tasks, maybe other users) would get its output, or none of their own.
    Its worker ends once it has answered, and another takes its place."""
    gate = fm.Gate(tmp_path / "gate")  # what was left prints once it opens
    place = str(gate.path)
    spec = fm.leaves_a_task.spec(place) if what == "task" else fm.leaves.spec(what, place)
    outcome = await executor.run(spec, _ctx())
    assert outcome.state == task_pb2.TASK_STATE_SUCCEEDED, outcome.result.error
    pid = int(outcome.result.output.fields["value"].string_value)
    await eventually(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie")
    await eventually(lambda: len(executor._pool._all) == executor._pool.size)
    printed: list[str] = []
    ctx = ExecutionContext(
        task_id="t", emit=lambda c: printed.append(c.data), output_tail_bytes=4096
    )
    gate.open()  # what was left, were it still running, prints now
    for _ in range(3):  # in the workers left and the new one
        outcome = await executor.run(fm.greet.spec("x"), ctx)
        assert outcome.state == task_pb2.TASK_STATE_SUCCEEDED
    assert "late" not in "".join(printed)


async def test_the_threads_of_asyncio_to_thread_are_not_left_behind(
    executor: FunctionExecutor,
) -> None:
    pids = [
        await _value(asyncio.ensure_future(executor.run(fm.pid_in_a_thread.spec(), _ctx())))
        for _ in range(3)
    ]
    assert len(set(pids)) == 1 and psutil.pid_exists(int(pids[0]))  # one worker, kept


async def test_calls_queued_behind_a_call_that_is_not_fast_go_to_other_workers(
    executor: FunctionExecutor, tmp_path: Path
) -> None:
    """A fast function's call that waits holds its worker: the answers it held go at once,
    and the calls queued behind it run in the other workers, each once, before it ends."""
    executor._pool.fast_below = 10.0  # whatever the machine's load: fast
    for _ in range(4):
        await executor.run(fm.slow_when.spec(0, -1, ""), _ctx())
    gate = fm.Gate(tmp_path / "gate")
    calls = [fm.slow_when.spec(x, 3, str(gate)) for x in range(8)]  # the 4th waits at it
    runs = [asyncio.create_task(executor.run(spec, _ctx())) for spec in calls]
    await asyncio.sleep(0)  # sent, in this turn of the loop: all to one worker
    assert sorted(len(w.held) for w in executor._pool._all) == [0, 0, 8]
    others = runs[:3] + runs[4:]
    async with asyncio.timeout(5):
        assert [await _value(r) for r in others] == [str(x) for x in range(8) if x != 3]
    assert not runs[3].done()
    gate.open()
    assert await _value(runs[3]) == "3"


async def test_what_an_async_call_prints_as_it_is_cancelled_is_its_output(
    executor: FunctionExecutor, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    printed: list[str] = []
    ctx = ExecutionContext(
        task_id="t", emit=lambda c: printed.append(c.data), output_tail_bytes=4096
    )
    run = asyncio.create_task(executor.run(fm.wait_async.spec(60, str(marker)), ctx))
    await eventually(lambda: marker.read_text() == "started", retry_on=(OSError,))
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert marker.read_text() == "cancelled"
    assert "stopping" in "".join(printed)


async def _fast(executor: FunctionExecutor, fn: Any, path: Path) -> None:
    executor._pool.fast_below = 10.0  # whatever the machine's load: fast
    for _ in range(4):
        await executor.run(fn.spec(str(path) + ".warm", 0), _ctx())


async def test_cancelling_a_call_that_has_ended_stops_no_other(
    executor: FunctionExecutor, tmp_path: Path
) -> None:
    """Its answer held by its worker, which runs a later call: that one is not killed (nor
    run again), and the cancelled one has ended."""
    log = tmp_path / "ran"
    await _fast(executor, fm.noted, log)
    gate = fm.Gate(tmp_path / "gate")
    runs = [
        asyncio.create_task(
            executor.run(fm.noted.spec(str(log), x, str(gate) if x == 4 else ""), _ctx())
        )
        for x in range(7)
    ]
    await asyncio.sleep(0)
    (worker,) = [w for w in executor._pool._all if w.held]
    await eventually(
        lambda: log.read_text().split() == ["0", "1", "2", "3", "4"], retry_on=(OSError,)
    )
    runs[0].cancel()  # ended in its worker: its answer held while 4 waits at the gate
    with contextlib.suppress(asyncio.CancelledError):
        await runs[0]
    gate.open()
    assert [await _value(r) for r in runs[1:]] == ["1", "2", "3", "4", "5", "6"]
    assert log.read_text().split() == [str(x) for x in range(7)]  # each once
    assert worker.alive  # never killed


async def test_a_recall_never_runs_a_call_twice(executor: FunctionExecutor, tmp_path: Path) -> None:
    """Async calls that each take longer than a look: those not started go elsewhere, those
    started end where they are."""
    log = tmp_path / "ran"
    await _fast(executor, fm.noted_async, log)
    runs = [
        asyncio.create_task(executor.run(fm.noted_async.spec(str(log), x, 0.06), _ctx()))
        for x in range(24)
    ]
    assert [await _value(r) for r in runs] == [str(x) for x in range(24)]
    assert sorted(map(int, log.read_text().split())) == list(range(24))


async def test_a_call_whose_worker_lies_and_dies_fails_in_the_end(
    executor: FunctionExecutor, tmp_path: Path
) -> None:
    """It says in its ledger that it ran nothing: it is sent elsewhere, as a call that never
    ran would be, DEATHS times at most; then it fails."""
    log = tmp_path / "ran"
    outcome = await executor.run(fm.lies_and_dies.spec(str(log)), _ctx())
    assert outcome.state == task_pb2.TASK_STATE_FAILED
    assert "worker process died" in outcome.result.error
    assert log.read_text().split() == ["ran"] * (DEATHS + 1)


async def test_fast_calls_past_one_workers_depth_fill_the_next_worker(
    executor: FunctionExecutor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = fm.Gate(tmp_path / "gate")
    await _made_fast(executor, gate)
    monkeypatch.setattr(executor._pool, "depth", 2)
    # Four started in one turn of the loop, two to a worker: two workers woken, not three.
    runs = [
        asyncio.create_task(executor.run(fm.pid_after.spec(str(gate)), _ctx())) for _ in range(4)
    ]

    def sent() -> None:
        assert sorted(len(w.held) for w in executor._pool._all) == [0, 2, 2]

    await eventually(sent)
    assert executor._pool.fast_held == 4
    ended: list[Outcome] = []
    for run in runs:
        run.add_done_callback(lambda r: ended.append(r.result()))
    gate.open()
    assert len({await _value(r) for r in runs}) == 2
    # A result says whether others sent with it are still to come (then its report waits a
    # moment for theirs); the last one does not.
    assert not ended[-1].more_follow and executor._pool.fast_held == 0


async def test_an_idle_worker_is_written_its_first_call_at_once_then_ever_more_at_once(
    executor: FunctionExecutor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = fm.Gate(tmp_path / "gate")
    await _made_fast(executor, gate)
    writes: list[int] = []  # frames in each write
    flush = process.WorkerProcess.flush

    def counted(worker: process.WorkerProcess) -> None:
        if worker._out:
            writes.append(len(worker._out))
        flush(worker)

    monkeypatch.setattr(process.WorkerProcess, "flush", counted)
    # 16 started in one turn of the loop, all to one worker: it starts on the first while the
    # node sends the others, FEED, then as many as were written before, and the rest at the
    # turn's end.
    assert executor._pool.depth >= 16
    runs = [
        asyncio.create_task(executor.run(fm.pid_after.spec(str(gate)), _ctx())) for _ in range(16)
    ]

    expected, left = [1], 15
    while left:
        expected.append(min(left, max(process.FEED, sum(expected))))
        left -= expected[-1]

    def written() -> None:
        assert writes == expected

    await eventually(written)
    gate.open()
    assert len({await _value(r) for r in runs}) == 1


async def test_nonsense_frames_from_a_worker_are_ignored(executor: FunctionExecutor) -> None:
    outcome = await executor.run(fm.says_nonsense.spec(), _ctx())
    assert outcome.state == task_pb2.TASK_STATE_SUCCEEDED, outcome.result.error
    assert outcome.result.output.fields["value"].string_value == '"said"'


async def test_output_that_is_not_utf8_arrives_as_text_and_as_its_exact_bytes(
    executor: FunctionExecutor,
) -> None:
    chunks: list[task_pb2.OutputChunk] = []
    ctx = ExecutionContext(task_id="t", emit=chunks.append, output_tail_bytes=4096)
    outcome = await executor.run(fm.prints_undecodable.spec(b"a\xffb".hex()), ctx)
    assert outcome.state == task_pb2.TASK_STATE_SUCCEEDED, outcome.result.error
    assert "".join(c.data for c in chunks) == "a\ufffdb\n"
    assert b"".join(chunk_bytes(c) for c in chunks) == b"a\xffb\n"
    assert stdout_bytes(outcome.result) == b"a\xffb\n"


async def test_what_commands_and_c_code_write_on_fd_1_and_2_is_the_calls_output(
    executor: FunctionExecutor,
) -> None:
    chunks: list[task_pb2.OutputChunk] = []
    ctx = ExecutionContext(task_id="t", emit=chunks.append, output_tail_bytes=1 << 16)
    outcome = await executor.run(fm.runs_commands.spec(b"a\xffb".hex()), ctx)
    assert outcome.state == task_pb2.TASK_STATE_SUCCEEDED, outcome.result.error
    out = [c for c in chunks if c.stream == task_pb2.OUTPUT_STREAM_STDOUT]
    err = [c for c in chunks if c.stream == task_pb2.OUTPUT_STREAM_STDERR]
    said = "first\nfrom-a-command\nthen\né\nthrough-fileno\nthrough-buffer\n"
    assert "".join(c.data for c in out) == said  # in the order written
    assert b"".join(chunk_bytes(c) for c in err) == b"to-its-stderr\na\xffb\n"
    assert stdout_bytes(outcome.result) == said.encode()
    # More than a pipe holds, while the call waits for its command: read as it comes.
    chunks.clear()
    outcome = await executor.run(fm.floods_a_pipe.spec(3 << 20), ctx)
    assert outcome.state == task_pb2.TASK_STATE_SUCCEEDED, outcome.result.error
    assert sum(len(chunk_bytes(c)) for c in chunks) == 3 << 20
    # Between calls, what a worker writes there is not a call's: the next call's is its own.
    outcome = await executor.run(fm.runs_commands.spec(b"x".hex()), ctx)
    assert stdout_bytes(outcome.result) == said.encode()


async def test_a_call_that_closes_fd_1_and_2_ends_its_worker_and_calls_go_on(
    executor: FunctionExecutor,
) -> None:
    """Later calls' commands would write nowhere, or into what took the descriptors."""
    closing = asyncio.ensure_future(executor.run(fm.closes_its_output.spec(), _ctx()))
    pid = int(await _value(closing))
    await eventually(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie")
    assert await _value(asyncio.ensure_future(executor.run(fm.add.spec(2, 3), _ctx()))) == "5"


async def test_a_call_cancelled_while_queued_never_runs(
    executor: FunctionExecutor, tmp_path: Path
) -> None:
    gate = fm.Gate(tmp_path / "gate")
    await _made_fast(executor, gate)
    pid_file = Path(f"{gate}.pid")
    pid_file.unlink()  # noqa: ASYNC240
    marker = tmp_path / "marker"
    for _ in range(4):
        await executor.run(fm.touch.spec(str(marker)), _ctx())
    marker.unlink()
    first = asyncio.create_task(executor.run(fm.pid_after.spec(str(gate)), _ctx()))
    queued = asyncio.create_task(executor.run(fm.touch.spec(str(marker)), _ctx()))
    await eventually(lambda: pid_file.read_text(), retry_on=(OSError,))
    [worker] = [w for w in executor._pool._all if w.held]
    assert len(worker.held) == 2
    posted = asyncio.Event()
    pool_cancel = executor._pool.cancel

    def cancel(call: Call) -> None:
        pool_cancel(call)
        posted.set()

    executor._pool.cancel = cancel  # type: ignore[method-assign]
    queued.cancel()
    # The cancel frame is written (the worker is still in the first call) before it ends.
    await posted.wait()

    def written() -> None:
        assert not worker._out

    await eventually(written)
    gate.open()
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert int(await _value(first)) > 0
    assert not marker.exists()


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")
async def test_the_one_file_executable_offers_no_functions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    ex = FunctionExecutor(NodeSettings(imports=["tests.integration.functions_module"], slots=1))
    assert ex.available() and not await ex.async_available()  # no interpreter to run them
    assert ex.functions() == []


async def test_workers_run_as_batch_processes(executor: FunctionExecutor) -> None:
    # Woken by the node's calls, a worker does not preempt the node mid-turn.
    pids = [w.pid for w in executor._pool._all]
    assert pids and all(os.sched_getscheduler(pid) == os.SCHED_BATCH for pid in pids)
    assert os.sched_getscheduler(0) != os.SCHED_BATCH  # the node's own policy is its own


@pytest.mark.parametrize("run_as", ["auto", "nobody"])
async def test_workers_run_as_the_run_as_user(run_as: str) -> None:
    """The rule of python tasks: as the run_as user when it can run this interpreter; else, under
    "auto", as the node's user, and a user named is not given up (functions not offered)."""
    others_can = await runs_python(TaskUsers(run_as))
    ex = FunctionExecutor(
        NodeSettings(imports=["tests.integration.functions_module"], slots=2, run_as=run_as)
    )
    try:
        offered = await ex.async_available()
        assert offered == (others_can or run_as == "auto")
        if not offered:
            return
        uids = {int(await _value(asyncio.create_task(_whoami(ex)))) for _ in range(4)}
        if not others_can:
            assert uids == {os.geteuid()}
        elif run_as == "auto":
            assert all(uid >= TASK_UID_BASE for uid in uids)  # a uid of its own per worker
        else:
            assert uids == {pwd.getpwnam("nobody").pw_uid}
    finally:
        await ex.aclose()


async def _whoami(ex: FunctionExecutor) -> Outcome:
    return await ex.run(fm.whoami.spec(), _ctx())


async def test_a_worker_is_not_read_while_its_call_holds_more_than_a_backlog(
    executor: FunctionExecutor,
) -> None:
    # Its output is not carried (the outbox is full): the node stops reading the worker, which
    # waits on its pipe, rather than holding all it prints.
    room = asyncio.Event()
    printed: list[int] = []

    async def paced() -> None:
        await room.wait()

    ctx = ExecutionContext(
        task_id="t",
        emit=lambda chunk: printed.append(len(chunk_bytes(chunk))),
        output_tail_bytes=4096,
        paced=paced,
    )
    run = asyncio.create_task(executor.run(fm.chatter.spec(16), ctx))

    def stalled() -> Call:
        calls = [c for w in executor._pool._all for c in w.held.values()]
        assert len(calls) == 1 and calls[0]._stalled is not None
        return calls[0]

    call = await eventually(stalled)
    await asyncio.sleep(0.5)  # time to print more, were it read
    assert BACKLOG < call._queued < 2 * BACKLOG
    assert not run.done()
    room.set()
    assert (await _value(run)) == "16"
    assert sum(printed) == 16 << 20


async def test_output_printed_at_once_beyond_a_frame_arrives_in_pieces(
    executor: FunctionExecutor,
) -> None:
    chunks: list[task_pb2.OutputChunk] = []
    ctx = ExecutionContext(task_id="t", emit=chunks.append, output_tail_bytes=4096)
    count = wire.MAX_FRAME // 2 + 1  # "é": two bytes each
    outcome = await executor.run(fm.prints_at_once.spec(count), ctx)
    assert outcome.state == task_pb2.TASK_STATE_SUCCEEDED, outcome.result.error
    assert sum(len(c.data) for c in chunks) == count
    pid = int(outcome.result.output.fields["value"].string_value)
    assert pid in {w.pid for w in executor._pool._all}  # its worker lives on


async def test_output_printed_line_by_line_goes_in_order_in_few_frames_and_live(
    executor: FunctionExecutor, tmp_path: Path
) -> None:
    """A call printing line after line (on stdout and stderr in turn) costs the node a frame per
    batch of lines, not one per write: every line arrives, in order, on its stream; and what it
    printed before it went on to wait is seen while it waits. Progress reported in a loop is
    sampled in the worker as the node would."""
    chunks: list[task_pb2.OutputChunk] = []
    reports: list[float] = []
    ctx = ExecutionContext(
        task_id="t",
        emit=chunks.append,
        output_tail_bytes=1 << 20,
        progress=lambda fraction, message: reports.append(fraction),
    )
    gate = fm.Gate(tmp_path / "gate")
    count = 20_000
    run = asyncio.create_task(executor.run(fm.prints_lines.spec(count, str(gate)), ctx))

    def all_printed() -> None:
        assert sum(c.data.count("\n") for c in chunks) == count

    try:
        await eventually(all_printed)
        assert not run.done()  # seen while the call still waits
    finally:
        gate.open()
    assert int(await _value(run)) == count
    for stream, odd in ((task_pb2.OUTPUT_STREAM_STDOUT, 0), (task_pb2.OUTPUT_STREAM_STDERR, 1)):
        text = "".join(c.data for c in chunks if c.stream == stream)
        assert text == "".join(f"{i}\n" for i in range(count) if i // 100 % 2 == odd)
    assert len(chunks) < count // 50  # a frame per run of a hundred lines, about
    assert 1 <= len(reports) < 100


async def test_a_worker_that_exits_while_its_child_holds_its_pipes_fails_its_call(
    executor: FunctionExecutor, tmp_path: Path
) -> None:
    marker, gate = tmp_path / "child", fm.Gate(tmp_path / "gate")
    try:
        async with asyncio.timeout(30):
            outcome = await executor.run(fm.forks_then_exits.spec(str(marker), str(gate)), _ctx())
        assert outcome.state == task_pb2.TASK_STATE_FAILED
        assert "worker process died (exit 3)" in outcome.result.error
        child = int(marker.read_text())
        await eventually(lambda: not _alive(child))  # killed with its worker's group
    finally:
        gate.open()
    assert await _value(asyncio.create_task(executor.run(fm.square.spec(3), _ctx()))) == "9"


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie that nobody has reaped yet does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def test_whatever_a_call_raises_is_its_outcome_and_its_worker_lives_on(
    executor: FunctionExecutor,
) -> None:
    """An exception whose str() raises, a BaseException that is not an Exception, a validator or
    serializer of the function's types raising: each fails its call as raised, in the same
    worker, which then runs the next call."""
    pid = int(await _value(asyncio.create_task(executor.run(fm.raises.spec("none"), _ctx()))))
    cases = [
        (fm.raises.spec("unprintable"), "Unprintable: <Unprintable: str() failed>"),
        (fm.raises.spec("base"), "NotAnException: not an Exception"),
        (fm.picky.spec(fm.Picky.model_construct(n=2)), "KeyError: 2"),
        (fm.stubborn.spec(), "LookupError: will not serialize"),
    ]
    for spec, error in cases:
        outcome = await executor.run(spec, _ctx())
        assert outcome.state == task_pb2.TASK_STATE_FAILED
        assert outcome.result.error.endswith(error), outcome.result.error
        again = await executor.run(fm.raises.spec("none"), _ctx())
        assert again.state == task_pb2.TASK_STATE_SUCCEEDED, again.result.error
        assert int(again.result.output.fields["value"].string_value) == pid  # the same worker
