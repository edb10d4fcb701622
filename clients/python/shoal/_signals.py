"""Waiting for the signals that stop a serving process (SIGINT, SIGTERM)."""

from __future__ import annotations

import asyncio
import logging
import signal

__all__ = ["until_signalled"]

_log = logging.getLogger("shoal")
_STOPPING = (signal.SIGINT, signal.SIGTERM)


async def until_signalled(done: asyncio.Event | None = None) -> None:
    """Wait for SIGINT or SIGTERM (or `done`). From then on a second signal cancels the calling
    task, so a drain that follows ends at once; the handlers go when the task ends."""
    loop = asyncio.get_running_loop()
    current = asyncio.current_task()
    assert current is not None
    signalled = asyncio.Event()
    for sig in _STOPPING:
        loop.add_signal_handler(sig, signalled.set)
    waits = [asyncio.create_task(e.wait()) for e in (signalled, done) if e is not None]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        _remove_handlers(loop)
        raise
    finally:
        for w in waits:
            w.cancel()
    _log.info("stopping (a second SIGINT or SIGTERM stops at once)")
    for sig in _STOPPING:
        loop.add_signal_handler(sig, current.cancel)
    current.add_done_callback(lambda _: _remove_handlers(loop))


def _remove_handlers(loop: asyncio.AbstractEventLoop) -> None:
    if not loop.is_closed():
        for sig in _STOPPING:
            loop.remove_signal_handler(sig)
