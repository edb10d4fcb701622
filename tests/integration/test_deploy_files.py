"""deploy/: the Kubernetes manifests pass schema validation, the systemd units pass
`systemd-analyze verify`, and the Compose file and Dockerfile hold what the README promises."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from .harness import BIN, run_tool

pytestmark = pytest.mark.timeout(120)

DEPLOY = Path(__file__).parents[2] / "deploy"


async def test_the_kubernetes_manifests_pass_strict_schema_validation() -> None:
    manifests = sorted((DEPLOY / "kubernetes").rglob("*.yaml"))  # postgres/ too
    assert manifests
    checked = await run_tool(
        [str(BIN / "kubernetes-validate"), "--strict", *map(str, manifests)], timeout=60
    )
    assert checked.returncode == 0, checked
    kinds = {doc["kind"] for m in manifests for doc in yaml.safe_load_all(m.read_text()) if doc}
    assert {"StatefulSet", "Deployment", "Service", "Secret", "PodDisruptionBudget"} <= kinds


async def test_the_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "install systemd (systemd-analyze)"
    units = sorted(map(str, (DEPLOY / "systemd").glob("*.service")))
    assert len(units) == 2
    # verify wants ExecStart's file to exist: a stand-in at /usr/local/bin/shoal, seen only in
    # a mount namespace of its own.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy2("/bin/true", bin_dir / "shoal")
    script = f'mount --bind "{bin_dir}" /usr/local/bin && exec "{analyze}" verify "$@"'
    checked = await run_tool(["unshare", "--mount", "sh", "-c", script, "sh", *units])
    assert (checked.returncode, checked.stderr) == (0, ""), checked


def test_the_compose_file_scales_nodes_on_one_image() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"coordinator", "node-token", "node"} <= set(services)
    assert {s["image"] for s in services.values()} == {"${SHOAL_IMAGE:-shoal:0.1.0}"}
    assert "ports" not in services["node"] and "container_name" not in services["node"]
