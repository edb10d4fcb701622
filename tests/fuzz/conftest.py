"""Fuzz fixtures: an in-process coordinator and node, served by an event loop on a thread.

The servers live on their own loop so that a synchronous test (Hypothesis drives it) can
feed them calls without blocking them, and so that a handler that hangs shows up as a
call with no answer rather than a stuck test.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from shoal.config import CoordinatorSettings, NodeSettings
from shoal.coordinator.server import CoordinatorServer
from shoal.node.agent import NodeAgent

_T = TypeVar("_T")

STARTUP = 15.0
"""Deadline in seconds for a server to come up or shut down."""

SAFE_EXECUTORS = frozenset({"noop"})
"""All the in-process node may run: fuzzed shell and python specs must never execute."""


class LoopThread:
    """An asyncio event loop on a thread of its own; other threads `run` coroutines on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="fuzz-servers", daemon=True
        )
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float = STARTUP) -> _T:
        """Run `coro` on the loop and return its result, within `timeout` seconds."""
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(STARTUP)
        assert not self._thread.is_alive(), "the server loop did not stop"
        self.loop.close()


@dataclass(frozen=True)
class Servers:
    """A running coordinator and a connected node, and the admin token both accept."""

    loop: LoopThread
    coordinator: CoordinatorServer
    node: NodeAgent
    token: str

    @property
    def node_address(self) -> str:
        return f"127.0.0.1:{self.node.port}"


async def _bounded(coro: Coroutine[Any, Any, None]) -> None:
    await asyncio.wait_for(coro, STARTUP)


async def _make_node(settings: NodeSettings) -> NodeAgent:
    return NodeAgent(settings)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    """A coordinator on loopback port 0 and a node that runs `noop` tasks only."""
    loop = LoopThread()
    try:
        coordinator = CoordinatorServer(
            CoordinatorSettings(
                listen="127.0.0.1:0",
                data_dir=tmp_path / "data",
                synchronous="NORMAL",  # no fsync per fuzzed submit; durability is not tested here
            )
        )
        loop.run(coordinator.start())
        try:
            node = loop.run(
                _make_node(
                    NodeSettings(
                        coordinator=coordinator.address,
                        node_id="fuzz-node",
                        listen="127.0.0.1:0",
                        token_file=coordinator.admin_token_path,
                        executors=sorted(SAFE_EXECUTORS),
                        slots=4,
                    )
                )
            )
            # Checked before the node starts: it must never be able to run fuzzed code.
            assert set(node.executors) == SAFE_EXECUTORS, sorted(node.executors)
            loop.run(node.start())
            try:
                loop.run(asyncio.wait_for(node.connected.wait(), STARTUP), STARTUP + 1)
                token = coordinator.admin_token_path.read_text().strip()
                yield Servers(loop, coordinator, node, token)
            finally:
                loop.run(_bounded(node.stop()), STARTUP + 5)
        finally:
            loop.run(_bounded(coordinator.stop()), STARTUP + 5)
    finally:
        # grpc.aio objects made on this loop must be freed while it still runs: freed later,
        # from another thread, their finalizer shuts grpc's poller down and hangs.
        gc.collect()
        loop.close()
