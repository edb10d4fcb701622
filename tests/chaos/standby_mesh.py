"""Coordinators on one PostgreSQL store, each in a network namespace of its own.

Each coordinator runs under `ip netns exec` and listens on its namespace's end of a veth pair;
nodes and clients in the root namespace reach every one of them there, and each reaches
PostgreSQL (in the root namespace) at its link's host end. `cut_off` drops only the leader's
traffic to and from PostgreSQL, so it keeps serving its callers but cannot renew its lease.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg

from shoal.config import ADMIN_TOKEN_FILE
from tests.chaos.netns import NetworkNamespace
from tests.integration.harness import CliProcess, CliProcesses, eventually, health_status
from tests.postgres import PostgresServer

__all__ = ["Coordinator", "StandbyMesh", "Takeover", "serving"]

PORT = 7070
"""Every coordinator's port, on its own namespace's address."""


@dataclass
class Coordinator:
    """One coordinator: its namespace, data directory and (while it runs) its process."""

    ns: NetworkNamespace
    data_dir: Path
    process: CliProcess | None = None

    @property
    def address(self) -> str:
        return f"{self.ns.ns_ip}:{PORT}"


@dataclass(frozen=True)
class Takeover:
    """One fault of the leader and how long the mesh went without one."""

    fault: str  # "SIGKILL" or "partition"
    deposed: str  # the address that led
    leader: str  # the address that leads after it
    seconds: float  # from the fault until the new leader answered SERVING


@dataclass
class StandbyMesh:
    """Coordinators (one per namespace) sharing the database `dbname` of `postgres`."""

    tmp_path: Path
    postgres: PostgresServer
    dbname: str
    cli: CliProcesses
    coordinators: list[Coordinator] = field(default_factory=list)

    @classmethod
    def of(
        cls,
        tmp_path: Path,
        postgres: PostgresServer,
        dbname: str,
        namespaces: list[NetworkNamespace],
    ) -> StandbyMesh:
        mesh = cls(tmp_path, postgres, dbname, CliProcesses(tmp_path))
        for i, ns in enumerate(namespaces):
            mesh.coordinators.append(Coordinator(ns, tmp_path / f"c{i}"))
        return mesh

    @property
    def addresses(self) -> str:
        """Every coordinator's address, comma-separated, as nodes and clients are given them."""
        return ",".join(c.address for c in self.coordinators)

    @property
    def token_file(self) -> Path:
        return self.coordinators[0].data_dir / ADMIN_TOKEN_FILE

    def by_address(self, address: str) -> Coordinator:
        (found,) = [c for c in self.coordinators if c.address == address]
        return found

    async def start(self, coordinator: Coordinator) -> None:
        """Start (or restart) `coordinator` in its namespace; returns once it answers health
        checks (it leads, or stands by: ready to take over)."""
        # One admin token for all: whichever leads finds it valid and makes no other.
        if self.token_file.exists() and coordinator is not self.coordinators[0]:
            coordinator.data_dir.mkdir(exist_ok=True)
            shutil.copy(self.token_file, coordinator.data_dir / ADMIN_TOKEN_FILE)
        name = coordinator.data_dir.name
        coordinator.process = await self.cli.start(
            "coordinator",
            "--listen",
            coordinator.address,
            "--store",
            self.postgres.url(self.dbname, host=coordinator.ns.host_ip),
            "--data-dir",
            str(coordinator.data_dir),
            "--advertise",
            "off",
            name=name,
            log_name=f"{name}.log",
            prefix=coordinator.ns.exec_prefix(),
        )

        async def answers() -> None:
            assert coordinator.process is not None and coordinator.process.running, self.logs()
            await health_status(coordinator.address)

        await eventually(answers, timeout=60, interval=0.1, retry_on=(grpc.aio.AioRpcError,))

    async def leader(self, other_than: str = "") -> str:
        """The address that leads by the store and answers SERVING (AssertionError if none)."""
        async with await psycopg.AsyncConnection.connect(
            self.postgres.url(self.dbname), connect_timeout=5
        ) as conn:
            made = await (await conn.execute("SELECT to_regclass('leader')")).fetchone()
            row: Any = None
            if made is not None and made[0] is not None:
                row = await (
                    await conn.execute("SELECT address FROM leader WHERE expires_at > now()")
                ).fetchone()
        address = str(row[0]) if row else ""
        assert address and address != other_than, f"leader {address!r}"
        assert await serving(address), f"{address} leads but does not serve"
        return address

    def logs(self) -> str:
        return self.cli.logs()


async def serving(address: str) -> bool:
    """Whether `address` answers its health check with SERVING (False when it cannot answer)."""
    try:
        return await health_status(address) == 1  # SERVING
    except Exception:
        return False
