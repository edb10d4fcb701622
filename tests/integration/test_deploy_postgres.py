"""deploy/compose.postgres.yaml: two coordinators on one PostgreSQL, nodes that know both."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from .harness import run_tool

COMPOSE = Path(__file__).parents[2] / "deploy" / "compose.postgres.yaml"


def test_both_coordinators_share_the_database_and_nodes_know_both() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    stores = {
        services[c]["environment"]["SHOAL_COORDINATOR_STORE"]
        for c in ("coordinator-a", "coordinator-b")
    }
    assert len(stores) == 1 and next(iter(stores)).startswith(
        "postgresql://shoal:${SHOAL_PG_PASSWORD"
    )
    assert "coordinator-a:7070,coordinator-b:7070" in services["node"]["command"][0]
    assert services["postgres"]["healthcheck"]


async def test_compose_accepts_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    compose = shutil.which("docker-compose")
    assert compose is not None, "docker-compose is not installed"
    monkeypatch.setenv("SHOAL_PG_PASSWORD", "checked")
    done = await run_tool([compose, "-f", str(COMPOSE), "config", "-q"])
    assert done.returncode == 0, done.stderr
