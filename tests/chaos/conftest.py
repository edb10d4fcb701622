"""Chaos fixtures: a cluster of real processes and a network namespace, both always torn down.

The figures each scenario publishes are printed again at the end of the session.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.chaos.cluster import Cluster
from tests.chaos.netns import NetworkNamespace


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """Starts processes on loopback; every one (and what it started) ends in teardown."""
    made = Cluster(tmp_path)
    try:
        yield made
    finally:
        await made.aclose()


@pytest.fixture
async def netns() -> AsyncIterator[NetworkNamespace]:
    """A namespace linked to this one by a veth pair; removed in teardown.

    Ask for it before `cluster` (fixtures end in reverse order), so that the processes inside
    it are gone before it is.
    """
    made = NetworkNamespace.for_this_process()
    await made.create()
    try:
        yield made
    finally:
        await made.delete()


@pytest.fixture
async def namespaces() -> AsyncIterator[list[NetworkNamespace]]:
    """Three namespaces, each linked to this one by a veth pair; all removed in teardown,
    however far their making got. Ask for them before what runs inside them."""
    made = [NetworkNamespace.numbered(i) for i in range(3)]
    try:
        for ns in made:
            await ns.create()
        yield made
    finally:
        for ns in made:
            await ns.delete()
