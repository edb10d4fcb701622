"""A cluster of real `shoal` processes that a test can kill, freeze and restart.

One coordinator process (auth on: nodes and clients use the admin token it writes) and node
processes, each configured through its own config file (`SHOAL_CONFIG`, one TOML table) so
that durations stay typed numbers; every node keeps a ledger (see ledger.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil

from shoal import AsyncClient
from shoal.config import ADMIN_TOKEN_FILE
from tests.chaos.ledger import Ledger
from tests.chaos.netns import NetworkNamespace
from tests.integration.harness import BIN, CliProcess, free_port, wait_serving

__all__ = ["GRACE", "HEARTBEAT", "LEASE", "RECONNECT_MAX", "Cluster", "descendants", "toml_table"]

LEASE = 3.0
"""Seconds a node may stay silent before the coordinator gives its tasks to others."""

HEARTBEAT = 0.5
"""Seconds between a node's heartbeats (the coordinator tells its nodes)."""

RECONNECT_MAX = 0.5
"""Seconds a node waits at most between attempts to reach its coordinator."""

GRACE = 5.0
"""Seconds a process gets to exit after SIGTERM in teardown before SIGKILL."""

Setting = str | int | float | bool | Path | Mapping[str, str] | list[str]


def toml_table(name: str, settings: Mapping[str, Setting]) -> str:
    """One TOML table; numbers stay numbers (a duration in seconds), paths become strings."""
    lines = [f"[{name}]"]
    for key, value in settings.items():
        lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Setting) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(json.dumps(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in value.items()) + "}"


@dataclass
class Cluster:
    """A coordinator process on a fixed port (so it can restart in place) and node processes.

    `aclose` ends every process it started, and what those started (tasks of a node killed
    under them included), whatever state it left them in (stopped, partitioned, killed).
    """

    tmp_path: Path
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    coordinator: CliProcess | None = None
    nodes: dict[str, CliProcess] = field(default_factory=dict)
    coordinator_settings: dict[str, Setting] = field(default_factory=dict)
    coordinator_env: dict[str, str] = field(default_factory=dict)  # on top of os.environ
    started: list[CliProcess] = field(default_factory=list)
    _frozen: set[int] = field(default_factory=set)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.tmp_path / "data"

    @property
    def token_file(self) -> Path:
        return self.data_dir / ADMIN_TOKEN_FILE

    def ledger_path(self, node_id: str) -> Path:
        return self.tmp_path / "ledgers" / f"{node_id}.jsonl"

    def ledger(self) -> Ledger:
        """Every node's ledger as it is now."""
        return Ledger.read(sorted((self.tmp_path / "ledgers").glob("*.jsonl")))

    def client(self) -> AsyncClient:
        return AsyncClient(self.address, token=self.token_file.read_text().strip())

    # -- processes ---------------------------------------------------------------------------

    async def start_coordinator(self, **settings: Setting) -> CliProcess:
        """Start the coordinator (a restart keeps the settings, the data dir and the port).

        Defaults: lease LEASE, heartbeats every HEARTBEAT; returns once it serves.
        """
        if not self.coordinator_settings:
            self.coordinator_settings = {"lease": LEASE, "heartbeat_interval": HEARTBEAT}
        self.coordinator_settings.update(settings)
        config = self._config("coordinator", "coordinator", self.coordinator_settings)
        cli = await self._spawn(
            "coordinator",
            [
                str(BIN / "shoal"),
                "coordinator",
                "--listen",
                self.address,
                "--data-dir",
                str(self.data_dir),
            ],
            config,
            self.coordinator_env,
        )
        self.coordinator = cli
        try:
            await wait_serving(self.address)
        except AssertionError as err:
            raise AssertionError(f"the coordinator did not come up:\n{self.logs()}") from err
        return cli

    async def kill_coordinator(self) -> float:
        """SIGKILL the coordinator; returns when (time.time()) it was sent."""
        assert self.coordinator is not None
        killed_at = time.time()
        code = await self.coordinator.kill()
        assert code == -signal.SIGKILL, f"the coordinator had exited ({code}):\n{self.logs()}"
        return killed_at

    async def start_node(
        self,
        node_id: str,
        *,
        slots: int = 1,
        labels: Mapping[str, str] | None = None,
        netns: NetworkNamespace | None = None,
        coordinator: str | None = None,
        **settings: Setting,
    ) -> CliProcess:
        """Start a node that keeps a ledger (inside `netns` when given) and dials `coordinator`
        (addresses, comma-separated; this cluster's by default); see `wait_nodes`."""
        self.ledger_path(node_id).parent.mkdir(exist_ok=True)
        config = self._config(
            node_id,
            "node",
            {
                "ledger": self.ledger_path(node_id),
                "token_file": self.token_file,
                "reconnect_max": RECONNECT_MAX,
                **settings,
            },
        )
        argv = [
            *(netns.exec_prefix() if netns else []),
            str(BIN / "shoal"),
            "node",
            "--coordinator",
            coordinator or self.address,
            "--node-id",
            node_id,
            "--slots",
            str(slots),
        ]
        for key, value in (labels or {}).items():
            argv += ["--label", f"{key}={value}"]
        cli = await self._spawn(node_id, argv, config)
        self.nodes[node_id] = cli
        return cli

    async def kill_node(self, node_id: str) -> float:
        """SIGKILL a node and the tasks it runs, as a machine that dies; returns when."""
        cli = self.nodes[node_id]
        orphans = descendants(cli.pid)
        killed_at = time.time()
        code = await cli.kill()
        _kill_all(orphans)
        assert code == -signal.SIGKILL, f"{node_id} had exited ({code}):\n{self.logs()}"
        return killed_at

    def freeze(self, node_id: str) -> float:
        """SIGSTOP a node (its tasks' processes run on); returns when."""
        pid = self.nodes[node_id].pid
        os.kill(pid, signal.SIGSTOP)
        self._frozen.add(pid)
        return time.time()

    def thaw(self, node_id: str) -> float:
        """SIGCONT a frozen node; returns when."""
        pid = self.nodes[node_id].pid
        os.kill(pid, signal.SIGCONT)
        self._frozen.discard(pid)
        return time.time()

    def logs(self) -> str:
        """Every process's output (its end) and every ledger, for failure messages."""
        out = [f"--- {c.name}\n{c.output()[-6000:]}" for c in self.started]
        for path in sorted((self.tmp_path / "ledgers").glob("*.jsonl")):
            out.append(f"--- ledger {path.name}\n{path.read_text()[-6000:]}")
        return "\n".join(out)

    async def aclose(self) -> None:
        """End every process, newest first: SIGCONT if frozen, SIGTERM, SIGKILL after GRACE."""
        for cli in reversed(self.started):
            orphans = descendants(cli.pid) if cli.running else []
            if cli.pid in self._frozen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(cli.pid, signal.SIGCONT)
            await cli.stop(GRACE)
            _kill_all(orphans)
        self._frozen.clear()

    def _config(self, name: str, table: str, settings: Mapping[str, Setting]) -> Path:
        path = self.tmp_path / "config" / f"{name}.toml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(toml_table(table, settings))
        return path

    async def _spawn(
        self, name: str, argv: list[str], config: Path, env: Mapping[str, str] | None = None
    ) -> CliProcess:
        log = self.tmp_path / f"{name}.log"  # a restart appends to the same log
        out: IO[bytes] = log.open("ab")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, **(env or {}), "SHOAL_CONFIG": str(config)},
            )
        finally:
            out.close()  # the child holds its own descriptor
        cli = CliProcess(name, argv, proc, log)
        self.started.append(cli)
        return cli


def descendants(pid: int) -> list[psutil.Process]:
    """Every process `pid` started, and those they started (none once it is gone)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _kill_all(processes: Iterable[psutil.Process]) -> None:
    for proc in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
