"""No-op tasks/s on PostgreSQL next to SQLite, and how long a standby takes to lead.

Throughput: for each store, one `shoal coordinator` (SQLite in a fresh data dir, or a fresh
database on a PostgreSQL server this script starts with initdb, fsync on) and one node with
--slots slots, all CLI processes on loopback; this client submits --tasks no-op tasks in
batches of --batch (at most --inflight batches unanswered) and waits for every outcome:
tasks/s = tasks / (first submit .. last outcome).

Takeover: three coordinators on one PostgreSQL database; the leader is killed with SIGKILL
--kills times (each killed one comes back as a standby); the time from the kill until another
answers its health check SERVING, p50 and max.

    .venv/bin/python bench/postgres.py
    .venv/bin/python bench/postgres.py --tasks 20000 --kills 10
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import psycopg
from _common import Child, Children, child_env, default_shoal, run_async
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shoal import AsyncClient, noop
from shoal.config import ADMIN_TOKEN_FILE
from shoal.specs import FINAL_STATES
from shoal.v1 import task_pb2
from tests.postgres import PostgresServer, postgres_server


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _serving(address: str) -> bool:
    return await _health(address) == int(health_pb2.HealthCheckResponse.SERVING)


async def _answers(address: str) -> bool:
    """Whether `address` answers its health check at all (leading or standing by)."""
    return await _health(address) is not None


async def _health(address: str) -> int | None:
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1.0
            )
            return int(reply.status)
    except grpc.RpcError:
        return None


async def _until(check: object, what: str, within: float = 60.0) -> None:
    stop_at = time.monotonic() + within
    while time.monotonic() < stop_at:
        if await check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.02)
    raise RuntimeError(f"{what}: not within {within:g} s")


def _coordinator(
    shoal: str, work: Path, children: Children, address: str, store: str, name: str
) -> Child:
    argv = [shoal, "coordinator", "--listen", address, "--data-dir", str(work / "data")]
    if store:
        argv += ["--store", store, "--no-auth"]
    return children.spawn(name, argv, work / f"{name}.log", child_env(work))


async def throughput(
    shoal: str, work: Path, store: str, args: argparse.Namespace, children: Children
) -> float:
    try:
        address = f"127.0.0.1:{_port()}"
        _coordinator(shoal, work, children, address, store, "coordinator")
        await _until(lambda: _serving(address), "the coordinator serves")
        if store:  # auth is off: the node and this client present any token
            (work / "data").mkdir(parents=True, exist_ok=True)
            (work / "data" / ADMIN_TOKEN_FILE).write_text("unused\n")
        token = (work / "data" / ADMIN_TOKEN_FILE).read_text().strip()
        children.spawn(
            "node",
            [shoal, "node", "-c", address, "--slots", str(args.slots), "--node-id", "bench"],
            work / "node.log",
            child_env(work),
        )
        async with AsyncClient(address, token=token) as client:

            async def one_node() -> bool:
                return any(n.connected for n in await client.nodes())

            await _until(one_node, "the node joins")
            gate = asyncio.Semaphore(args.inflight)
            outcomes: dict[str, int] = {}
            all_done = asyncio.Event()

            async def follow() -> None:
                # Outcome events from the start of this fresh store: none is missed.
                async for event in client.watch(since=0, states=FINAL_STATES):
                    outcomes[event.task_id] = event.state
                    if len(outcomes) >= args.tasks:
                        all_done.set()
                        return

            async def batch(n: int) -> None:
                async with gate:
                    await client.submit_batch([noop()] * n)

            watching = asyncio.create_task(follow())
            started = time.monotonic()
            sizes = [min(args.batch, args.tasks - i) for i in range(0, args.tasks, args.batch)]
            await asyncio.gather(*(batch(n) for n in sizes))
            await asyncio.wait_for(all_done.wait(), 600)
            took = time.monotonic() - started
            watching.cancel()
            failed = [t for t, state in outcomes.items() if state != task_pb2.TASK_STATE_SUCCEEDED]
            if failed:
                raise RuntimeError(f"{len(failed)} tasks did not succeed, e.g. {failed[0]}")
            return float(args.tasks / took)
    finally:
        children.stop_all()


async def takeovers(
    shoal: str, work: Path, url: str, kills: int, children: Children
) -> list[float]:
    try:
        coordinators: dict[str, Child] = {}
        addresses = [f"127.0.0.1:{_port()}" for _ in range(3)]

        def start(address: str) -> None:
            name = f"c{address.rsplit(':', 1)[1]}"
            coordinators[address] = _coordinator(shoal, work, children, address, url, name)

        for address in addresses:
            start(address)
        times: list[float] = []

        async def ready() -> None:
            """Every coordinator answers: a kill always leaves two standbys ready to lead."""
            for address in addresses:
                await _until(lambda a=address: _answers(a), f"{address} answers")

        async def leader(other_than: str = "") -> str:
            while True:
                with psycopg.connect(url) as conn:
                    made = conn.execute("SELECT to_regclass('leader')").fetchone()
                    row = None
                    if made is not None and made[0] is not None:
                        row = conn.execute(
                            "SELECT address FROM leader WHERE expires_at > now()"
                        ).fetchone()
                if row and row[0] != other_than and await _serving(row[0]):
                    return str(row[0])
                await asyncio.sleep(0.02)

        for _ in range(kills):
            await ready()
            leading = await asyncio.wait_for(leader(), 60)
            children.stop(coordinators[leading], grace=0, sig=9)
            killed = time.monotonic()
            await asyncio.wait_for(leader(other_than=leading), 60)
            times.append(time.monotonic() - killed)
            print(f"  takeover {len(times)}: {times[-1]:.2f} s", flush=True)
            start(leading)
        return times
    finally:
        children.stop_all()


async def bench(args: argparse.Namespace, children: Children) -> None:
    shoal = default_shoal()
    with tempfile.TemporaryDirectory(prefix="shoal-bench-pg-") as tmp, postgres_server() as pg:
        root = Path(tmp)
        rates = {}
        for name, store in (("SQLite", ""), ("PostgreSQL", _database(pg))):
            work = root / name
            work.mkdir()
            rates[name] = await throughput(shoal, work, store, args, children)
            print(f"{name:<11} {rates[name]:8.0f} no-op tasks/s", flush=True)
        ratio = rates["PostgreSQL"] / rates["SQLite"]
        print(f"PostgreSQL / SQLite: {ratio:.2f} (goal: at least 0.5)")
        if not args.kills:
            return
        work = root / "takeover"
        work.mkdir()
        times = await takeovers(shoal, work, _database(pg), args.kills, children)
        print(
            f"takeover after SIGKILL over {len(times)} kills: p50 {statistics.median(times):.2f} s,"
            f" max {max(times):.2f} s (goal: within 5 s)"
        )


def _database(pg: PostgresServer) -> str:
    return pg.database()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--inflight", type=int, default=4)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--kills", type=int, default=10)
    args = parser.parse_args()
    run_async(lambda children: bench(args, children))
    return 0


if __name__ == "__main__":
    sys.exit(main())
