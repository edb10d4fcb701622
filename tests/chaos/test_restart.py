"""Chaos: results that finish while the coordinator is down are recorded, and nothing runs twice.

A node process runs tasks; the coordinator process is killed (kill -9) or stopped (SIGTERM);
the tasks finish while it is down; it restarts in place. The node sends the results again
with its next session and claims their attempts in its Hello: each task runs once (by the
node's ledger) and is recorded once.
"""

from __future__ import annotations

import pytest

from shoal import shell
from shoal.v1 import task_pb2
from tests.chaos.cluster import GRACE, Cluster
from tests.chaos.harness import observe, wait_nodes, wait_state
from tests.chaos.recorder import EventRecorder
from tests.chaos.summary import publish
from tests.chaos.test_chaos import RUNNING, SUCCEEDED
from tests.integration.harness import eventually, gate_script

TASKS = 12
# Long enough that the node keeps its lease (and so its tasks) while the coordinator restarts.
LEASE = 15.0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stop", ["kill", "term"])
async def test_results_finished_while_the_coordinator_is_down_are_kept(
    cluster: Cluster, stop: str
) -> None:
    gate = cluster.tmp_path / "gate"
    await cluster.start_coordinator(lease=LEASE)
    await cluster.start_node("node-a", slots=TASKS)
    specs = [
        shell(["sh", "-c", gate_script(gate, f"echo {i}")], idempotency_key=f"down-{stop}-{i}")
        for i in range(TASKS)
    ]

    async with cluster.client() as client, EventRecorder(client) as recorder:
        await wait_nodes(client, ["node-a"])
        ids = await client.submit_batch(specs)
        for task_id in ids:
            await wait_state(client, task_id, RUNNING)
        assert cluster.coordinator is not None
        if stop == "kill":
            await cluster.kill_coordinator()
        else:
            code = await cluster.coordinator.stop(GRACE * 4)
            assert code == 0, f"not a graceful stop ({code}):\n{cluster.logs()}"
        gate.touch()

        async def finished_while_down() -> None:
            done = cluster.ledger().select(event="finish")
            assert len(done) == TASKS, f"{len(done)} of {TASKS} finished"

        await eventually(finished_while_down, timeout=30)
        await cluster.start_coordinator()
        await recorder.wait_final(ids, timeout=60)
        seen = await observe(f"coordinator-{stop}-results-down", cluster, client, recorder, ids)

    starts = cluster.ledger().select(event="start")
    seen.report.figures["executions"] = str(len(starts))
    publish(seen.report.line())
    assert seen.report.safe, f"{seen.report.problems()}\n{cluster.logs()}"
    assert sorted(line.task for line in starts) == sorted(ids), "a task ran again"
    states = {t.state for t in seen.tasks.values() if t is not None}
    assert states == {SUCCEEDED}, [task_pb2.TaskState.Name(s) for s in states]
