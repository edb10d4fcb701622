"""The floor under batched throughput: what each task costs one Python process before any
scheduling, quota or bookkeeping logic — the messages it must decode and encode, and the two
rows it must write.

What is measured, in-process, per batch of --batch no-op tasks, on one thread as the
coordinator's event loop does it (the store's own thread does the SQLite work, as it does in
the coordinator, synchronous=FULL):
  1. decode the SubmitBatchRequest a client sent, and serialize each spec for its row;
  2. insert the rows (SqliteStore.insert) and commit;
  3. encode the AssignmentBatch for the node;
  4. decode the node's UpdateBatch (Started and Finished for each task);
  5. record the outcomes (SqliteStore.finish) and commit;
  6. encode the WatchResponse of outcome events for the client.
No gRPC: each stream message would add its own cost on top (batched, it is shared). The figure
is µs of wall time per task, and the tasks/s that one core could at best carry at that cost.

    .venv/bin/python bench/floor.py                 # writes bench/results/floor.json
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import RESULTS, figure, finish, meta

from shoal import noop
from shoal.coordinator.store import FinishedRow, SqliteStore, TaskRow
from shoal.v1 import node_pb2, task_pb2, tasks_pb2


async def _cycle(
    store: SqliteStore, request: bytes, first_seq: int, times: dict[str, float]
) -> None:
    clock = time.perf_counter

    t = clock()
    specs = tasks_pb2.SubmitBatchRequest.FromString(request).specs
    ids = [f"{first_seq + i:016x}" for i in range(len(specs))]
    rows = [
        TaskRow(first_seq + i, ids[i], None, "", 3, spec.SerializeToString(), 0.0, "bench")
        for i, spec in enumerate(specs)
    ]
    times["decode submit"] += clock() - t

    t = clock()
    await store.insert(rows)
    times["insert rows"] += clock() - t

    t = clock()
    attempt = task_pb2.AttemptId(epoch=1, number=1)
    batch = node_pb2.AssignmentBatch(
        assignments=[
            node_pb2.Assignment(task_id=task_id, attempt=attempt, spec=spec)
            for task_id, spec in zip(ids, specs, strict=True)
        ]
    )
    sent = node_pb2.CoordinatorMessage(assignments=batch).SerializeToString()
    times["encode assignments"] += clock() - t

    # What the node sends back (made outside the timing: it is the node's work).
    updates = node_pb2.UpdateBatch()
    for task_id in ids:
        updates.updates.add(task_id=task_id, attempt=attempt, started=node_pb2.Started())
        updates.updates.add(
            task_id=task_id,
            attempt=attempt,
            finished=node_pb2.Finished(
                state=task_pb2.TASK_STATE_SUCCEEDED, result=task_pb2.TaskResult(exit_code=0)
            ),
        )
    received = node_pb2.NodeMessage(updates=updates).SerializeToString()
    assert sent

    t = clock()
    finished = [
        u
        for u in node_pb2.NodeMessage.FromString(received).updates.updates
        if u.HasField("finished")
    ]
    times["decode updates"] += clock() - t

    t = clock()
    now = time.time()
    await store.finish(
        [
            FinishedRow(
                u.task_id,
                u.finished.state,
                first_seq + len(ids) + i,
                now,
                now,
                "node",
                1,
                1,
                u.finished.result.SerializeToString(),
                seq=first_seq + i,
            )
            for i, u in enumerate(finished)
        ]
    )
    times["record outcomes"] += clock() - t

    t = clock()
    response = tasks_pb2.WatchResponse(cursor=first_seq + 2 * len(ids))
    for i, u in enumerate(finished):
        event = response.events.add(
            seq=first_seq + len(ids) + i,
            task_id=u.task_id,
            state=u.finished.state,
            node_id="node",
            result=u.finished.result,
        )
        event.attempt.CopyFrom(u.attempt)
        event.time.FromNanoseconds(time.time_ns())
    response.SerializeToString()
    times["encode events"] += clock() - t


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="shoal-bench-floor-"))
    store = SqliteStore(workdir / "shoal.db", synchronous="FULL")
    await store.open()
    request = tasks_pb2.SubmitBatchRequest(specs=[noop()] * args.batch).SerializeToString()
    times = dict.fromkeys(
        (
            "decode submit",
            "insert rows",
            "encode assignments",
            "decode updates",
            "record outcomes",
            "encode events",
        ),
        0.0,
    )
    try:
        seq = 1
        await _cycle(store, request, seq, dict(times))  # warm-up, not counted
        seq += 2 * args.batch
        tasks = 0
        while tasks < args.tasks:
            await _cycle(store, request, seq, times)
            seq += 2 * args.batch
            tasks += args.batch
    finally:
        await store.close()
        shutil.rmtree(workdir, ignore_errors=True)
    per_task = {k: v / tasks * 1e6 for k, v in times.items()}
    total = sum(per_task.values())
    figures = [figure(f"floor: {k}", round(v, 1), "µs/task") for k, v in per_task.items()]
    figures.append(figure("floor: all of it", round(total, 1), "µs/task"))
    figures.append(figure("floor: tasks/s one core could carry", round(1e6 / total), "tasks/s"))
    return {"meta": meta(args), "per_task_us": per_task, "figures": figures}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="The per-task floor of the work a coordinator cannot skip.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--batch", type=int, default=1000, help="tasks per batch")
    p.add_argument("--tasks", type=int, default=100_000, help="tasks timed")
    p.add_argument("--out", type=Path, default=RESULTS / "floor.json", help="JSON output")
    args = p.parse_args(argv)
    if min(args.batch, args.tasks) < 1:
        p.error("--batch and --tasks must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return finish(asyncio.run(bench(args)), args.out)


if __name__ == "__main__":
    sys.exit(main())
