"""Prometheus metrics of a coordinator, read from its state when scraped (nothing on the hot
path but a counter of outcomes).

The HTTP server runs in its own thread; every scrape takes one snapshot on the event loop, so
it reads the core's state as the loop sees it and never while it changes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from shoal._server import reason
from shoal.specs import state_name

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from shoal.coordinator.engine import Coordinator

__all__ = ["MetricsServer"]

_SCRAPE_TIMEOUT = 5.0


def _gauge(
    name: str, doc: str, labels: list[str], values: dict[tuple[str, ...], float]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family


class _Snapshot(Collector):
    def __init__(self, core: Coordinator, loop: asyncio.AbstractEventLoop) -> None:
        self._core = core
        self._loop = loop

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        future = asyncio.run_coroutine_threadsafe(self._read(), self._loop)
        yield from future.result(_SCRAPE_TIMEOUT)

    async def _read(self) -> list[GaugeMetricFamily | CounterMetricFamily]:
        core = self._core
        finished = CounterMetricFamily(
            "shoal_tasks_finished", "Tasks that reached a final state", labels=["state"]
        )
        for state, n in sorted(core.finished_count.items()):
            finished.add_metric([state_name(state).lower()], n)
        nodes = core.nodes()
        waiting: dict[tuple[str, ...], float] = {}
        for key, n in core.waiting_count().items():
            kind, _, name = key.partition(":")
            waiting[kind, name] = n
        return [
            finished,
            _gauge(
                "shoal_unfinished_tasks",
                "Tasks accepted and not final, by tenant",
                ["tenant"],
                {(t,): n for t, n in core.unfinished_count.items() if n},
            ),
            _gauge(
                "shoal_queued_tasks",
                "Tasks ready and waiting for a node",
                [],
                {(): core.queued_count},
            ),
            _gauge(
                "shoal_waiting_tasks",
                "Tasks held back by a quota or a lock (contention), by key",
                ["gate", "key"],
                waiting,
            ),
            _gauge(
                "shoal_node_running_tasks",
                "Tasks running on each connected node",
                ["node"],
                {(n.info.node_id,): n.running for n in nodes},
            ),
            _gauge(
                "shoal_node_draining",
                "1 while a node drains",
                ["node"],
                {(n.info.node_id,): float(n.draining) for n in nodes},
            ),
            _gauge(
                "shoal_breakers_open",
                "Circuit breakers not closed",
                [],
                {(): core.breakers_open},
            ),
        ]


class MetricsServer:
    """Serves /metrics for a coordinator on `listen` (host:port); `stop` ends it."""

    def __init__(self, core: Coordinator, listen: str) -> None:
        self._core = core
        self._listen = listen
        self._server: WSGIServer | None = None
        self.port = 0

    def start(self) -> None:
        """Serve; FailedPrecondition naming the process that holds the port, if one does."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Snapshot(self._core, asyncio.get_running_loop()))
        host, _, port = self._listen.rpartition(":")
        if not port.isdigit():
            raise OSError(f"cannot serve metrics on {self._listen!r}: expected host:port")
        try:
            self._server, _ = start_http_server(
                int(port), addr=host.strip("[]") or "127.0.0.1", registry=registry
            )
        except OSError as err:
            raise OSError(
                f"cannot serve metrics on {self._listen}: {reason(err, int(port))}"
            ) from err
        self.port = self._server.server_port

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            # Off the loop: a scrape in progress waits for the loop to answer it.
            await asyncio.to_thread(server.shutdown)
            server.server_close()
