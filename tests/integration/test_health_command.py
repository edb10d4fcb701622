"""`shoal health ADDRESS`: what container health checks and probes run."""

from __future__ import annotations

import pytest

from .harness import BIN, Mesh, free_port, run_tool

pytestmark = pytest.mark.timeout(60)


async def test_health_exits_0_only_for_a_serving_server(mesh: Mesh) -> None:
    for address in (mesh.address, mesh.node_address):
        serving = await run_tool([str(BIN / "shoal"), "health", address])
        assert (serving.returncode, serving.stdout) == (0, "SERVING\n"), serving
    nobody = await run_tool(
        [str(BIN / "shoal"), "health", f"127.0.0.1:{free_port()}", "--timeout", "1"]
    )
    assert (nobody.returncode, nobody.stdout) == (1, "UNKNOWN\n"), nobody
