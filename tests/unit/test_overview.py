"""Admin.GetOverview's counters, read from the engine without gRPC."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shoal import shell
from shoal.auth import Principal, Role
from shoal.coordinator.engine import Coordinator
from shoal.coordinator.store import SqliteStore
from shoal.v1 import node_pb2, task_pb2

ADMIN = Principal("root", Role.ADMIN)
BLUE = Principal("blue", Role.SUBMITTER, tenant="blue")
RED = Principal("red", Role.SUBMITTER, tenant="red")

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def core(tmp_path: Path) -> AsyncIterator[Coordinator]:
    c = Coordinator(SqliteStore(tmp_path / "s.db"))
    await c.start()
    yield c
    await c.stop()


def _spec(tenant: str, priority: int) -> task_pb2.TaskSpec:
    spec = shell("true")
    spec.tenant = tenant
    spec.priority = priority  # type: ignore[assignment]
    return spec


async def test_overview_counts_queue_by_priority_and_tenant_and_outcomes(
    core: Coordinator,
) -> None:
    high, low = task_pb2.PRIORITY_HIGH, task_pb2.PRIORITY_LOW
    await core.submit([_spec("blue", high), _spec("blue", high), _spec("blue", low)], by=BLUE)
    await core.submit([_spec("red", low)], by=RED)
    before = core.overview(by=ADMIN)
    assert {(q.priority, q.tenant, q.tasks) for q in before.queued} == {
        (high, "blue", 2),
        (low, "blue", 1),
        (low, "red", 1),
    }
    assert dict(before.unfinished) == {"blue": 3, "red": 1}
    assert before.running == 0 and before.nodes == 0 and not before.finished

    info = node_pb2.NodeInfo(node_id="n1", executors=["shell"], slots=2)
    session = core.attach(node_pb2.Hello(info=info), "peer", by=ADMIN)
    messages = await session.outgoing()
    assert messages is not None
    sent = [a for m in messages for a in m.assignments.assignments]
    assert len(sent) == 2
    done = node_pb2.TaskUpdate(
        task_id=sent[0].task_id,
        attempt=sent[0].attempt,
        finished=node_pb2.Finished(state=task_pb2.TASK_STATE_SUCCEEDED),
    )
    core.on_message(session, node_pb2.NodeMessage(updates=node_pb2.UpdateBatch(updates=[done])))
    await core.wait(sent[0].task_id, None, by=ADMIN)

    after = core.overview(by=ADMIN)
    assert dict(after.finished) == {"SUCCEEDED": 1}
    # The freed slot took the next task at once: two run, one waits.
    assert after.running == 2 and after.nodes == 1
    assert sum(q.tasks for q in after.queued) == 1
    assert after.last_seq >= before.last_seq + 3


async def test_a_tenant_sees_only_its_own_queue_and_no_mesh_wide_figures(
    core: Coordinator,
) -> None:
    await core.submit([_spec("blue", task_pb2.PRIORITY_NORMAL)], by=BLUE)
    await core.submit([_spec("red", task_pb2.PRIORITY_NORMAL)], by=RED)
    seen = core.overview(by=RED)
    assert [(q.tenant, q.tasks) for q in seen.queued] == [("red", 1)]
    assert dict(seen.unfinished) == {"red": 1}
    assert not seen.finished and not seen.held and seen.running == 0
