"""A node's mDNS advertisement follows its capabilities, seen by a real browser on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from zeroconf import InterfaceChoice, IPVersion
from zeroconf.asyncio import AsyncZeroconf

from shoal._mdns import Browser, decode_node
from shoal.config import NodeSettings
from shoal.discovery import NODE_SERVICE, NodeAd
from shoal.node.discovery import NodeDiscovery
from shoal.v1 import node_pb2

from .harness import eventually

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def browser() -> AsyncIterator[Browser[NodeAd]]:
    zc = AsyncZeroconf(interfaces=InterfaceChoice.All, ip_version=IPVersion.V4Only)
    nodes = Browser(zc, NODE_SERVICE, decode_node)
    nodes.async_start()
    try:
        yield nodes
    finally:
        await nodes.async_close()
        await zc.async_close()


async def test_the_advertisement_changes_with_the_node_capabilities_and_goes_at_stop(
    browser: Browser[NodeAd], tmp_path: Path
) -> None:
    info = node_pb2.NodeInfo(node_id="adv-1", executors=["shell"], version="1")
    settings = NodeSettings(node_id="adv-1", listen="127.0.0.1:0", advertise="on", standalone=True)
    discovery = NodeDiscovery(settings, lambda: info, refresh_every=timedelta(seconds=0.1))
    await discovery.async_start(4242)
    try:

        def advertised() -> NodeAd:
            found = [ad for ad in browser.seen.values() if ad.node_id == "adv-1"]
            assert found, browser.seen
            return found[0]

        first = await eventually(advertised, timeout=10)
        assert (first.executors, first.models) == (("shell",), ())

        # Ollama came up with a model, and Docker answers now: peers hear it, unasked.
        info = node_pb2.NodeInfo(
            node_id="adv-1", executors=["docker", "shell"], ollama_models=["llama3"], version="1"
        )

        def updated() -> None:
            ad = advertised()
            assert (ad.executors, ad.models) == (("docker", "shell"), ("llama3",)), ad

        await eventually(updated, timeout=10)
    finally:
        await discovery.async_stop()

    def withdrawn() -> None:
        assert all(ad.node_id != "adv-1" for ad in browser.seen.values())

    await eventually(withdrawn, timeout=10)
