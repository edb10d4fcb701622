"""Three coordinators on one PostgreSQL store, nodes and a client that know all three, and
the leader killed with SIGKILL again and again while tasks flow: no task is lost, none is
recorded twice, and each takeover's time is published.

Bounded by default; SHOAL_CHAOS_STANDBY_KILLS and SHOAL_CHAOS_STANDBY_TASKS make it bigger
(e.g. 10 kills and 5000 tasks).
"""

from __future__ import annotations

import asyncio
import functools
import os
import statistics
import time
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest

from shoal import AsyncClient
from shoal.config import ADMIN_TOKEN_FILE
from shoal.v1 import task_pb2
from tests.chaos.summary import publish
from tests.integration.harness import (
    CliProcess,
    CliProcesses,
    eventually,
    free_port,
    health_status,
)

KILLS = int(os.environ.get("SHOAL_CHAOS_STANDBY_KILLS", "3"))
TASKS = int(os.environ.get("SHOAL_CHAOS_STANDBY_TASKS", "600"))
BATCH = 20


def _leader(url: str) -> str:
    """Whom the store says leads ("" for none, or before the first coordinator made it)."""
    with psycopg.connect(url) as conn:
        made = conn.execute("SELECT to_regclass('leader')").fetchone()
        if made is None or made[0] is None:
            return ""
        row = conn.execute("SELECT address FROM leader WHERE expires_at > now()").fetchone()
        return str(row[0]) if row else ""


async def _serving(address: str) -> bool:
    try:
        return await health_status(address) == 1  # SERVING
    except Exception:
        return False


async def _leads(url: str, other_than: str = "") -> str:
    leader = _leader(url)
    assert leader and leader != other_than and await _serving(leader)
    return leader


@pytest.mark.timeout(600)
async def test_killing_the_leader_loses_no_task_and_records_none_twice(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = tmp_path / ADMIN_TOKEN_FILE
    token.write_text("unused\n")  # auth is off: nodes present whatever it holds
    monkeypatch.setenv("SHOAL_NODE_TOKEN_FILE", str(token))
    cli = CliProcesses(tmp_path)
    ports = [free_port() for _ in range(3)]
    addresses = [f"127.0.0.1:{p}" for p in ports]
    everyone = ",".join(addresses)
    coordinators: dict[str, CliProcess] = {}

    async def start(address: str) -> None:
        name = f"c{address.rsplit(':', 1)[1]}"
        coordinators[address] = await cli.start(
            "coordinator",
            "--listen",
            address,
            "--store",
            postgres_url,
            "--no-auth",
            "--data-dir",
            str(tmp_path / name),
            name=name,
            log_name=f"{name}.log",
        )

    try:
        for address in addresses:
            await start(address)
        for n in range(2):
            await cli.start(
                "node", "-c", everyone, "--node-id", f"n{n}", "--slots", "8", name=f"n{n}"
            )
        client = AsyncClient(everyone, token="unused", retry_for=timedelta(seconds=60))
        ids: list[str] = []

        async def submit_all() -> None:
            for i in range(0, TASKS, BATCH):
                specs = [
                    task_pb2.TaskSpec(shell=task_pb2.ShellSpec(argv=["true"]))
                    for _ in range(min(BATCH, TASKS - i))
                ]
                ids.extend(await client.submit_batch(specs))

        await eventually(lambda: _leads(postgres_url), timeout=60)
        submitting = asyncio.create_task(submit_all())
        takeovers: list[float] = []
        try:
            for _ in range(KILLS):
                leader = await eventually(lambda: _leads(postgres_url), timeout=60)
                await asyncio.sleep(1.0)  # tasks flow through this leader a while
                await coordinators[leader].kill()
                killed = time.monotonic()
                await eventually(
                    functools.partial(_leads, postgres_url, leader), timeout=60, interval=0.05
                )
                takeovers.append(time.monotonic() - killed)
                await start(leader)  # back as a standby
            await submitting
            finals = [await client.wait(task_id) for task_id in ids]
        finally:
            submitting.cancel()
            await client.close()
        assert len(ids) == TASKS and len(set(ids)) == TASKS
        assert {t.state for t in finals} == {task_pb2.TASK_STATE_SUCCEEDED}
        with psycopg.connect(postgres_url) as conn:
            counts = conn.execute(
                "SELECT count(*), count(DISTINCT id), count(final_seq), count(DISTINCT final_seq)"
                " FROM tasks"
            ).fetchone()
        # One row per task, each with one outcome of its own.
        assert counts == (TASKS, TASKS, TASKS, TASKS), cli.logs()
        publish(
            f"standby chaos: {TASKS} tasks, {KILLS} leader SIGKILLs: 0 lost, 0 recorded twice;"
            f" takeover p50 {statistics.median(takeovers):.2f} s, max {max(takeovers):.2f} s"
            f" ({', '.join(f'{t:.2f}' for t in takeovers)})"
        )
    finally:
        await cli.aclose()
