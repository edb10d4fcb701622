"""The PostgreSQL variants of deploy/: Compose and Kubernetes run two coordinators on one
database, only the leader is ready, and nodes know every coordinator."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from .harness import run_tool

COMPOSE = Path(__file__).parents[2] / "deploy" / "compose.postgres.yaml"
KUBERNETES = Path(__file__).parents[2] / "deploy" / "kubernetes" / "postgres" / "shoal.yaml"


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


def _manifests() -> dict[tuple[str, str], dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(KUBERNETES.read_text()) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def test_kubernetes_runs_standbys_on_one_database_and_readies_only_the_leader() -> None:
    found = _manifests()
    coordinators = found[("StatefulSet", "shoal-coordinator")]["spec"]
    replicas = coordinators["replicas"]
    assert replicas >= 2
    (container,) = coordinators["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["SHOAL_COORDINATOR_STORE"]["valueFrom"]["secretKeyRef"] == {
        "name": "shoal-store",
        "key": "dsn",
    }
    assert ("Secret", "shoal-store") in found
    # gRPC health is NOT_SERVING on a standby: readiness asks it, liveness must not.
    assert container["readinessProbe"]["grpc"]["port"] == 7070
    assert "grpc" not in container["livenessProbe"]
    assert not coordinators["template"]["spec"].get("volumeClaimTemplates")
    pods = coordinators["serviceName"]
    assert found[("Service", pods)]["spec"]["publishNotReadyAddresses"] is True
    assert f"--reachable-at=$(POD_NAME).{pods}:7070" in container["args"]
    # Nodes know every replica by its stable name.
    (node,) = found[("Deployment", "shoal-node")]["spec"]["template"]["spec"]["containers"]
    (given,) = [a for a in node["args"] if a.startswith("--coordinator=")]
    expected = [f"shoal-coordinator-{i}.{pods}:7070" for i in range(replicas)]
    assert given.removeprefix("--coordinator=").split(",") == expected
