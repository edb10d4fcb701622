"""The wheel as a program that uses only the SDK installs it: without the extras that serve."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from .harness import Mesh, run_tool

pytestmark = pytest.mark.timeout(600)  # one worker runs the module (see tests/workers.py)

ROOT = Path(__file__).parents[2]
_NOT_SOURCE = frozenset({"build", "dist", "test-artifacts"})
"""Top-level folders a copy of the tree leaves out, with its dot-folders (.git, .venv, caches)
and *.egg-info: what installs, builds and runs leave."""
SERVING_ONLY = ("docker", "ollama", "httpx", "croniter", "prometheus-client", "cryptography")
"""Distributions that only `shoal[coordinator]` or `shoal[node]` bring."""


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv with the wheel built from this tree and only the client's dependencies."""
    where = tmp_path_factory.mktemp("packaging")
    wheels = where / "wheels"
    source = _source_copy(where)
    build = ["wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)]
    subprocess.run([sys.executable, "-m", "pip", *build], check=True)
    (wheel,) = wheels.glob("shoal-*.whl")
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)], check=True
    )
    return venv / "bin"


def _source_copy(where: Path) -> Path:
    """A copy of this tree's sources in `where`: setuptools builds in the tree it is given
    (build/, *.egg-info), and the repository's are shared with whatever else runs there."""
    source = where / "source"
    shutil.copytree(ROOT, source, ignore=_leave_out, symlinks=True)
    return source


def _leave_out(folder: str, names: list[str]) -> set[str]:
    top = Path(folder) == ROOT
    return {
        n
        for n in names
        if (top and (n in _NOT_SOURCE or n.endswith(".egg-info") or n.startswith(".")))
        or n == "__pycache__"
    }


def test_the_client_install_leaves_the_serving_dependencies_out(client_venv: Path) -> None:
    installed = subprocess.run(
        [str(client_venv / "python"), "-m", "pip", "list", "--format=freeze"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    names = {line.split("==")[0].lower() for line in installed.split()}

    assert "shoal" in names and "grpcio" in names
    assert names.isdisjoint(SERVING_ONLY), names & set(SERVING_ONLY)


async def test_the_sdk_and_cli_of_a_client_install_submit_to_a_real_coordinator(
    client_venv: Path, mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    python = str(client_venv / "python")
    script = (
        "import sys\n"
        "from shoal import Client, shell\n"
        "with Client(sys.argv[1], token=sys.argv[2]) as client:\n"
        "    task = client.submit(shell('echo from-the-sdk'))\n"
        "    print(client.wait(task.id).result.stdout, end='')\n"
    )
    sdk = await run_tool([python, "-c", script, mesh.address, mesh.token], timeout=60)
    helped = await run_tool([str(client_venv / "shoal"), "--help"], timeout=60)
    monkeypatch.setenv("SHOAL_TOKEN", mesh.token)
    ran = await run_tool(
        [str(client_venv / "shoal"), "run", "-c", mesh.address, "--", "echo", "from-the-cli"],
        timeout=60,
    )

    assert sdk.returncode == 0 and sdk.stdout == "from-the-sdk\n", sdk.stderr
    assert helped.returncode == 0 and "coordinator" in helped.stdout, helped.stderr
    assert ran.returncode == 0 and "from-the-cli\n" in ran.stdout, ran.stderr


@pytest.mark.parametrize(
    ("command", "extra"),
    [
        (["coordinator"], "shoal[coordinator]"),
        (["node", "--coordinator", "127.0.0.1:1"], "shoal[node]"),
        (["up"], "shoal[coordinator,node]"),
        (["certs", "init", "--dir", "{tmp}"], "shoal[coordinator]"),
    ],
)
async def test_a_serving_command_without_its_extra_names_the_extra_in_one_line(
    client_venv: Path, tmp_path: Path, command: list[str], extra: str
) -> None:
    argv = [arg.format(tmp=tmp_path) for arg in command]
    done = await run_tool([str(client_venv / "shoal"), *argv], timeout=60)

    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr
    assert f"pip install '{extra}'" in done.stderr


def test_the_wheel_carries_the_protos_license_and_metadata(client_venv: Path) -> None:
    script = (
        "import importlib.metadata as m, importlib.resources as r\n"
        "protos = r.files('shoal') / 'protos' / 'shoal' / 'v1'\n"
        "print(sorted(p.name for p in protos.iterdir() if p.name.endswith('.proto')))\n"
        "meta = m.metadata('shoal')\n"
        "print(meta['License-Expression'], len(meta.get_all('Project-URL')),"
        " len(meta.get_all('Classifier')), meta['Author'])\n"
        "print(any(f.name == 'LICENSE' for f in m.files('shoal')))\n"
        "print((r.files('shoal.coordinator') / 'dashboard' / 'index.html').is_file())\n"
    )
    done = subprocess.run(
        [str(client_venv / "python"), "-c", script], check=True, capture_output=True, text=True
    )
    protos, meta, license_file, dashboard = done.stdout.splitlines()

    assert protos == str(sorted(p.name for p in (ROOT / "protos" / "shoal" / "v1").glob("*.proto")))
    license_name, urls, classifiers, author = meta.split(" ", 3)
    assert license_name == "Apache-2.0" and int(urls) >= 2 and int(classifiers) >= 5 and author
    assert license_file == "True"
    assert dashboard == "True"  # the dashboard's files ship in the package


def test_the_sdist_carries_the_protos_and_license(tmp_path: Path) -> None:
    build = (
        "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", build, str(tmp_path / "sdist")],
        cwd=_source_copy(tmp_path),
        check=True,
        capture_output=True,
        text=True,
    )
    sdist = tmp_path / "sdist" / done.stdout.split()[-1]
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}

    assert "LICENSE" in names
    assert {
        f"protos/shoal/v1/{p.name}" for p in (ROOT / "protos/shoal/v1").glob("*.proto")
    } <= names
