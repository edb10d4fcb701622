"""Waiting for the signals that stop a serving process (SIGINT, SIGTERM)."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

__all__ = ["until_signalled"]

_log = logging.getLogger("shoal")
_STOPPING = (signal.SIGINT, signal.SIGTERM)


async def until_signalled(done: asyncio.Event | None = None) -> None:
    """Wait for SIGINT or SIGTERM (or `done`). From then on a second signal cancels the calling
    task, so a drain that follows ends at once; the handlers from before are back when the
    task ends."""
    loop = asyncio.get_running_loop()
    current = asyncio.current_task()
    assert current is not None
    previous = {sig: signal.getsignal(sig) for sig in _STOPPING}
    signalled = asyncio.Event()
    for sig in _STOPPING:
        loop.add_signal_handler(sig, signalled.set)
    waits = [asyncio.create_task(e.wait()) for e in (signalled, done) if e is not None]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        _restore(loop, previous)
        raise
    finally:
        for w in waits:
            w.cancel()
    _log.info("stopping (a second SIGINT or SIGTERM stops at once)")
    for sig in _STOPPING:
        loop.add_signal_handler(sig, current.cancel)
    current.add_done_callback(lambda _: _restore(loop, previous))


def _restore(loop: asyncio.AbstractEventLoop, previous: dict[signal.Signals, Any]) -> None:
    """The handlers from before (asyncio's own removal would leave the defaults)."""
    for sig, handler in previous.items():
        if not loop.is_closed():
            loop.remove_signal_handler(sig)
        if handler is not None:
            signal.signal(sig, handler)
