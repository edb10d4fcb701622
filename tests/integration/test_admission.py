"""Admission under overload: clients that wait as told get their share against eager ones."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from shoal import AsyncClient, noop
from shoal.errors import ResourceExhausted
from tests.integration.harness import MeshFactory

CLIENTS = 3  # of each kind
ACCEPTED = 120  # tasks accepted in all before the count stops
EAGER_RETRY = 0.05  # seconds an eager client waits before trying again, whatever it is told


@pytest.mark.timeout(120)
async def test_clients_that_wait_as_told_get_a_fair_share(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(slots=4, executors=["noop"], coordinator={"max_queued": 8})
    accepted = {"polite": 0, "eager": 0}
    enough = asyncio.Event()

    def count(kind: str) -> None:
        accepted[kind] += 1
        if sum(accepted.values()) >= ACCEPTED:
            enough.set()

    async def polite() -> None:
        async with AsyncClient(mesh.address, token=mesh.token, wait_when_full=True) as client:
            while not enough.is_set():
                await client.submit(noop({"sleep": 0.05}))
                count("polite")

    async def eager() -> None:
        async with AsyncClient(mesh.address, token=mesh.token) as client:
            while not enough.is_set():
                try:
                    await client.submit(noop({"sleep": 0.05}))
                except ResourceExhausted:
                    await asyncio.sleep(EAGER_RETRY)  # its own retry pace, not a wait
                    continue
                count("eager")

    clients = [asyncio.create_task(polite()) for _ in range(CLIENTS)]
    clients += [asyncio.create_task(eager()) for _ in range(CLIENTS)]
    try:
        await asyncio.wait_for(enough.wait(), 100)
    finally:
        for task in clients:
            task.cancel()
        for task in clients:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    # Without a line, eager clients took about three times the polite ones' share.
    assert accepted["polite"] >= 0.6 * accepted["eager"], accepted
