"""A coordinator process that is stopped (SIGTERM) while clients watch it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from shoal import AsyncClient, Unavailable, shell
from shoal.config import ADMIN_TOKEN_FILE

from .harness import CliProcesses, free_port

pytestmark = pytest.mark.timeout(60)


async def test_sigterm_ends_open_watches_cleanly(cli: CliProcesses, tmp_path: Path) -> None:
    port = free_port()
    coordinator = await cli.coordinator(port, tmp_path / "data")
    token = (tmp_path / "data" / ADMIN_TOKEN_FILE).read_text().strip()
    async with AsyncClient(f"127.0.0.1:{port}", token=token) as client:
        await client.submit(shell("true"))
        watches = [client.watch(since=0, reconnect=False) for _ in range(3)]
        for watch in watches:
            await anext(watch)  # open: its replay began; it goes on to follow live events
        assert await coordinator.stop() == 0
        for watch in watches:
            # Ended by the coordinator with a status that says why (the SDK resumes on it),
            # not cut when the server's grace ran out.
            with pytest.raises(Unavailable, match="shutting down"):
                async with asyncio.timeout(10):
                    while True:
                        await anext(watch)
    log = coordinator.output()
    assert "coordinator started" in log
    for bad in ("ERROR", "Traceback", "CancelledError"):
        assert bad not in log, log
