"""The image of deploy/docker, built offline by a real engine, and deploy/compose.yaml: a
coordinator and three nodes of that image run 100 tasks; everything is removed after."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from shoal import AsyncClient, shell
from shoal.v1 import task_pb2
from tests.integration.docker_engine import DockerEngine
from tests.integration.harness import eventually, free_port

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[2]
COLD = 240.0  # seconds: containers start the executable (it unpacks itself) on a busy machine


async def run(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), COLD)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def test_compose_brings_up_a_coordinator_and_three_nodes_that_run_100_tasks(
    docker_engine: DockerEngine,
    executable: Path,
) -> None:
    # The image's context from the executable already built (-o: make does not rebuild it).
    code, out = await run(["make", "-o", str(executable), f"DIST={executable}", "image-context"])
    assert code == 0, out
    tag = f"shoal:test-{uuid.uuid4().hex[:8]}"
    image, _ = docker_engine.client.images.build(path=str(REPO / "build/image"), tag=tag, rm=True)
    project, port = f"shoal-test-{uuid.uuid4().hex[:8]}", free_port()
    env = dict(os.environ, SHOAL_IMAGE=tag, SHOAL_PORT=str(port))
    if docker_engine.host:
        env["DOCKER_HOST"] = docker_engine.host
    compose = ["docker-compose", "-p", project, "-f", "deploy/compose.yaml"]
    try:
        config = image.attrs["Config"]
        assert config["User"] == "10001:10001" and config["Healthcheck"]["Test"], config

        code, out = await run([*compose, "up", "-d", "--scale", "node=3"], env)
        assert code == 0, out
        code, token = await run(
            [*compose, "exec", "-T", "coordinator", "cat", "/var/lib/shoal/admin.token"], env
        )
        assert code == 0, token

        async with AsyncClient(f"127.0.0.1:{port}", token=token.strip()) as client:

            async def three_nodes() -> None:
                nodes = [n.info.node_id for n in await client.nodes()]
                assert len(nodes) == 3 and all(n.startswith("node-") for n in nodes), nodes

            await eventually(three_nodes, timeout=COLD, interval=1.0)
            ids = await client.submit_batch(shell(f"echo {i}") for i in range(100))
            done = [await client.wait(i, timeout=timedelta(seconds=COLD)) for i in ids]
        assert all(t.state == task_pb2.TASK_STATE_SUCCEEDED for t in done)
        assert [t.result.stdout for t in done] == [f"{i}\n" for i in range(100)]
        assert len({t.node_id for t in done}) >= 2, {t.node_id for t in done}
    finally:
        code, out = await run([*compose, "down", "-v", "--timeout", "40"], env)
        docker_engine.client.images.remove(tag, force=True)
    assert code == 0, out
    left = docker_engine.client.containers.list(
        all=True, filters={"label": f"com.docker.compose.project={project}"}
    )
    assert not left, left
