"""The node's background loops: sampling the machine's load for its resource guard, and
looking now and then at what its executors offer (the models an Ollama server holds)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Iterable

import psutil

from shoal.node.executors.base import Executor
from shoal.node.guard import ResourceGuard

__all__ = ["follow_offers", "refresh_offers", "watch_load"]

_log = logging.getLogger("shoal.node")
_SAMPLE_LOAD_EVERY = 1.0  # seconds between two samples of the machine's load (the guard)
_REFRESH_OFFERS_EVERY = 10.0  # seconds between two looks at what executors offer


async def refresh_offers(executors: Iterable[Executor]) -> bool:
    """Have each executor look again at what it offers; whether any of it changed."""
    changed = await asyncio.gather(*(e.async_refresh() for e in executors))
    return any(changed)


async def follow_offers(
    executors: Callable[[], Iterable[Executor]], on_change: Callable[[], object]
) -> None:
    """Refresh the executors' offers every few seconds, calling `on_change` when they changed."""
    while True:
        await asyncio.sleep(_REFRESH_OFFERS_EVERY)
        if await refresh_offers(executors()):
            on_change()


async def watch_load(
    guard: ResourceGuard,
    *,
    node_id: str,
    task_sessions: Callable[[], Collection[int]],
    on_change: Callable[[ResourceGuard], object],
) -> None:
    """Sample the machine's foreground load every second; call `on_change` when the guard
    turns busy or calm. A failed sample is logged and changes nothing."""
    while True:
        try:
            changed = await guard.async_check(task_sessions())
        except (psutil.Error, OSError) as err:
            _log.warning("node=%s cannot sample the machine's load: %s", node_id, err)
            changed = False
        if changed:
            on_change(guard)
        await asyncio.sleep(_SAMPLE_LOAD_EVERY)
