"""Dependencies, retries, time and cancellation, end to end on a real node."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from shoal import AsyncClient, InvalidArgument, ResourceExhausted, noop, python, retry, shell
from shoal.v1 import admin_pb2, task_pb2

from .harness import Mesh, MeshFactory, eventually, gate_script

pytestmark = pytest.mark.timeout(60)
WAIT = timedelta(seconds=30)
S = task_pb2


async def test_a_diamond_passes_outputs_downstream(mesh: Mesh) -> None:
    ids = await mesh.client.submit_batch(
        [
            shell("echo 5", name="source"),
            python(
                'import os; print(int(os.environ["N"]) * 2)',
                env={"N": "${{ deps[0].stdout }}"},
                depends_on=[0],
                name="double",
            ),
            shell('expr "$N" + 1', env={"N": "${{ deps[0].stdout }}"}, depends_on=[0], name="inc"),
            shell(["echo", "${{ deps[0].stdout }} and ${{ deps[1].stdout }}"], depends_on=[1, 2]),
        ]
    )
    sink = await mesh.client.wait(ids[3], timeout=WAIT)

    assert sink.state == S.TASK_STATE_SUCCEEDED, sink.result.error
    assert sink.result.stdout == "10 and 6\n"
    assert list(sink.depends_on) == ids[1:3]
    assert list((await mesh.client.get(ids[0])).depends_on) == []


async def test_a_failed_upstream_skips_its_dependents_unless_told_otherwise(mesh: Mesh) -> None:
    anyway = S.Dependency(batch_index=0, run_on_failure=True)
    ids = await mesh.client.submit_batch(
        [
            shell("exit 3"),
            shell("echo never", depends_on=[0]),
            shell("echo never either", depends_on=[1]),
            shell(["echo", "upstream said ${{ deps[0].exit_code }}"], depends_on=[anyway]),
        ]
    )
    done = [await mesh.client.wait(i, timeout=WAIT) for i in ids]

    assert [t.state for t in done] == [
        S.TASK_STATE_FAILED,
        S.TASK_STATE_SKIPPED,
        S.TASK_STATE_SKIPPED,
        S.TASK_STATE_SUCCEEDED,
    ]
    assert ids[0] in done[1].result.error and "FAILED" in done[1].result.error
    assert ids[1] in done[2].result.error and "SKIPPED" in done[2].result.error
    assert done[3].result.stdout == "upstream said 3\n"


async def test_a_task_can_depend_on_an_existing_finished_task(mesh: Mesh) -> None:
    first = await mesh.client.submit(shell("echo earlier"))
    await mesh.client.wait(first.id, timeout=WAIT)
    later = await mesh.client.submit(
        shell(["echo", "${{ deps[0].stdout }}"], depends_on=[first.id])
    )
    assert (await mesh.client.wait(later.id, timeout=WAIT)).result.stdout == "earlier\n"


async def test_an_upstream_output_reaches_code_as_data_never_as_code(
    mesh: Mesh, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    hostile = f"$(touch {marker})`touch {marker}`'\"; __import__('os').system('touch {marker}')"
    up = {"UP": "${{ deps[0].stdout }}"}
    ids = await mesh.client.submit_batch(
        [
            python(f"print({hostile!r})"),
            shell('printf "%s" "$UP"', env=up, depends_on=[0]),
            python('import os; print(os.environ["UP"], end="")', env=up, depends_on=[0]),
            shell(["printf", "%s", "${{ deps[0].stdout }}"], depends_on=[0]),
        ]
    )
    for i in ids[1:]:
        done = await mesh.client.wait(i, timeout=WAIT)
        assert (done.state, done.result.stdout) == (S.TASK_STATE_SUCCEEDED, hostile)
    assert not marker.exists()

    with pytest.raises(InvalidArgument) as refused:
        await mesh.client.submit_batch(
            [shell("true"), shell("echo ${{ deps[0].stdout }}", depends_on=[0])]
        )
    [violation] = refused.value.violations
    assert violation.field == "specs[1].shell.script" and "env value" in violation.description
    assert len(await mesh.client.list()) == len(ids)


async def test_cycles_and_unknown_upstreams_are_refused_and_nothing_is_stored(
    mesh: Mesh,
) -> None:
    with pytest.raises(InvalidArgument, match="cycle"):
        await mesh.client.submit_batch(
            [shell("true", depends_on=[1]), shell("true", depends_on=[0]), shell("true")]
        )
    with pytest.raises(InvalidArgument, match="no task 'nope'"):
        await mesh.client.submit_batch([shell("true"), shell("true", depends_on=["nope"])])
    assert await mesh.client.list() == []


async def test_a_long_cycle_or_many_bad_specs_are_refused_within_the_metadata_limit(
    mesh: Mesh,
) -> None:
    n = 3000
    with pytest.raises(InvalidArgument) as cycle:
        await mesh.client.submit_batch([shell("true", depends_on=[(i + 1) % n]) for i in range(n)])
    assert "cycle: specs[0] -> specs[1]" in cycle.value.message
    assert f"and {n - 5} more -> specs[0]" in cycle.value.message

    with pytest.raises(InvalidArgument) as many:
        await mesh.client.submit_batch([S.TaskSpec(name=f"{i}" * 100) for i in range(n)])
    assert many.value.violations[0].field == "specs[0].kind"
    assert many.value.violations[-1].description.endswith(" more")
    assert await mesh.client.list() == []


async def test_a_flaky_task_succeeds_on_its_third_attempt_after_backing_off(
    mesh: Mesh, tmp_path: Path
) -> None:
    counter = tmp_path / "runs"
    flaky = (
        f"n=$(cat {counter} 2>/dev/null || echo 0); n=$((n + 1)); echo $n > {counter};"
        ' echo "run $n"; [ $n -ge 3 ]'
    )
    policy = retry(5, backoff=timedelta(milliseconds=200), multiplier=2)
    task = await mesh.client.submit(shell(flaky, retry=policy))
    done = await mesh.client.wait(task.id, timeout=WAIT)

    assert done.state == S.TASK_STATE_SUCCEEDED
    assert done.result.stdout == "run 3\n"
    assert [a.state for a in done.attempts] == [S.TASK_STATE_FAILED] * 2
    assert [a.result.stdout for a in done.attempts] == ["run 1\n", "run 2\n"]
    # Equal jitter: at least half of each backoff (0.2 s, then 0.4 s) passed between attempts.
    starts = [a.started_at.ToDatetime() for a in done.attempts] + [done.started_at.ToDatetime()]
    ends = [a.finished_at.ToDatetime() for a in done.attempts]
    gaps = [(starts[i + 1] - ends[i]).total_seconds() for i in range(2)]
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2, gaps
    stored = await mesh.client.get(task.id)
    assert len(stored.attempts) == 2


async def test_retries_stop_at_max_attempts_and_only_for_listed_exit_codes(mesh: Mesh) -> None:
    fast = timedelta(milliseconds=10)
    always = await mesh.client.submit(shell("exit 7", retry=retry(3, backoff=fast)))
    other = await mesh.client.submit(shell("exit 2", retry=retry(3, backoff=fast, exit_codes=[7])))

    exhausted = await mesh.client.wait(always.id, timeout=WAIT)
    not_listed = await mesh.client.wait(other.id, timeout=WAIT)
    assert exhausted.state == S.TASK_STATE_FAILED and len(exhausted.attempts) == 2
    assert not_listed.state == S.TASK_STATE_FAILED and len(not_listed.attempts) == 0


async def test_a_task_not_started_within_its_queue_timeout_times_out(mesh: Mesh) -> None:
    task = await mesh.client.submit(
        shell("true", labels={"gpu": "h100"}, queue_timeout=timedelta(milliseconds=300))
    )
    done = await mesh.client.wait(task.id, timeout=WAIT)
    assert done.state == S.TASK_STATE_TIMED_OUT
    assert "queue timeout" in done.result.error


async def test_not_before_holds_a_task_back(mesh: Mesh) -> None:
    at = datetime.now(UTC) + timedelta(milliseconds=600)
    task = await mesh.client.submit(shell("true", not_before=at))
    waiting = await mesh.client.get(task.id)
    assert waiting.state == S.TASK_STATE_PENDING
    assert waiting.pending_reason.startswith("not before")
    done = await mesh.client.wait(task.id, timeout=WAIT)
    assert done.state == S.TASK_STATE_SUCCEEDED
    assert done.started_at.ToDatetime(tzinfo=UTC) >= at


async def test_cancel_cascades_to_dependents(mesh: Mesh, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    ids = await mesh.client.submit_batch(
        [
            shell(gate_script(gate)),
            shell("echo child", depends_on=[0]),
            shell("echo grandchild", depends_on=[1]),
        ]
    )

    async def running() -> None:
        assert (await mesh.client.get(ids[0])).state == S.TASK_STATE_RUNNING

    await eventually(running)
    waiting = await mesh.client.get(ids[2])
    assert waiting.state == S.TASK_STATE_PENDING
    assert ids[1] in waiting.pending_reason
    await mesh.client.cancel(ids[0])
    done = [await mesh.client.wait(i, timeout=WAIT) for i in ids]
    assert [t.state for t in done] == [S.TASK_STATE_CANCELLED] * 3
    assert "upstream" in done[2].result.error


async def test_an_interval_schedule_runs_its_task_until_paused(mesh: Mesh) -> None:
    schedule = admin_pb2.Schedule(name="heartbeat", spec=shell(["echo", "beat"]))
    schedule.every.FromSeconds(1)
    made = await mesh.client.create_schedule(schedule)
    assert made.next_run.ToDatetime(tzinfo=UTC) > datetime.now(UTC)

    async def ran_twice() -> list[task_pb2.Task]:
        runs = [t for t in await mesh.client.list() if t.spec.metadata["shoal.schedule"]]
        assert sum(t.state == S.TASK_STATE_SUCCEEDED for t in runs) >= 2
        return runs

    runs = await eventually(ran_twice, timeout=20)
    paused = await mesh.client.schedule_action("pause", "heartbeat")
    assert paused.paused and paused.runs >= 2
    assert {t.result.stdout for t in runs if t.state == S.TASK_STATE_SUCCEEDED} == {"beat\n"}
    (listed,) = await mesh.client.schedules()
    assert listed.last_task_id in {t.id for t in await mesh.client.list()}


async def test_the_sdk_waits_out_backpressure_when_asked(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(slots=1, executors=["noop"], coordinator={"max_queued": 2})
    work = [noop({"sleep": 0.3, "i": i}) for i in range(6)]
    with pytest.raises(ResourceExhausted) as refused:
        for spec in work:
            await mesh.client.submit(spec)
    assert refused.value.retry_after is not None  # as the queue drains, jittered
    assert timedelta(0) < refused.value.retry_after <= timedelta(seconds=12)

    async with AsyncClient(mesh.address, token=mesh.token, wait_when_full=True) as patient:
        ids = [(await patient.submit(spec)).id for spec in work]
    done = [await mesh.client.wait(i, timeout=WAIT) for i in ids]
    assert {t.state for t in done} == {S.TASK_STATE_SUCCEEDED}
