"""The node's fingerprint: nvidia-smi, a Docker engine and an Ollama server, each real where it
can be (a stand-in nvidia-smi script, HTTP servers answering as Docker and Ollama do)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest

from shoal.config import NodeSettings
from shoal.node.agent import NodeAgent
from shoal.node.fingerprint import (
    Fingerprint,
    Gpu,
    MachineProbe,
    async_docker_available,
    async_gpus,
    async_ollama_models,
    parse_nvidia_smi,
)
from shoal.v1 import node_pb2, node_pb2_grpc

pytestmark = pytest.mark.timeout(30)

SMI_OUTPUT = "NVIDIA A100-SXM4-80GB, 81920 MiB\nNVIDIA GeForce RTX 4090, 24564 MiB\n"


class _Engine(BaseHTTPRequestHandler):
    """Answers as a Docker engine (GET /version, /vX/_ping) and an Ollama server (/api/tags)."""

    def do_GET(self) -> None:
        if self.path.endswith("/version"):
            self._send("application/json", json.dumps({"ApiVersion": "1.45"}))
        elif self.path.endswith("/_ping"):
            self._send("text/plain", "OK")
        elif self.path == "/api/tags":
            models = [{"model": "llama3.2:1b", "name": "llama3.2:1b"}, {"model": "qwen3:0.6b"}]
            self._send("application/json", json.dumps({"models": models}))
        else:
            self.send_error(404)

    def _send(self, kind: str, body: str) -> None:
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def engine() -> Iterator[str]:
    """host:port of an HTTP server answering as Docker and Ollama; stopped and joined after."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Engine)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        assert not thread.is_alive()


@pytest.fixture
def closed_port() -> str:
    """host:port where nothing listens."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Engine)
    port = server.server_address[1]
    server.server_close()
    return f"127.0.0.1:{port}"


def fake_nvidia_smi(bin_dir: Path, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "nvidia-smi"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)


def test_nvidia_smi_output_gives_names_and_memory() -> None:
    assert parse_nvidia_smi(SMI_OUTPUT) == (
        Gpu("NVIDIA A100-SXM4-80GB", 81920),
        Gpu("NVIDIA GeForce RTX 4090", 24564),
    )
    assert parse_nvidia_smi("Tesla T4, [N/A]\n\n") == (Gpu("Tesla T4", 0),)
    assert parse_nvidia_smi("") == ()


async def test_gpus_come_from_nvidia_smi_when_it_is_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stand-in checks that it is asked what the node means to ask.
    fake_nvidia_smi(
        tmp_path / "bin",
        '[ "$1 $2" = "--query-gpu=name,memory.total --format=csv,noheader" ] || exit 2\n'
        f"printf '{SMI_OUTPUT}'",
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")

    gpus = await async_gpus(5.0)

    assert [g.name for g in gpus] == ["NVIDIA A100-SXM4-80GB", "NVIDIA GeForce RTX 4090"]


async def test_no_gpus_without_nvidia_smi_or_when_it_fails_or_hangs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert await async_gpus(5.0) == ()

    fake_nvidia_smi(tmp_path / "failing", "echo 'NVIDIA-SMI has failed' >&2; exit 9")
    monkeypatch.setenv("PATH", f"{tmp_path / 'failing'}:/usr/bin:/bin")
    assert await async_gpus(5.0) == ()

    fake_nvidia_smi(tmp_path / "hanging", "exec sleep 30")
    monkeypatch.setenv("PATH", f"{tmp_path / 'hanging'}:/usr/bin:/bin")
    started = time.monotonic()
    assert await async_gpus(0.3) == ()
    assert time.monotonic() - started < 5.0  # the hung process was killed, not waited for


async def test_docker_is_available_when_an_engine_answers(
    engine: str, closed_port: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"tcp://{engine}")
    assert await async_docker_available(5.0) is True

    monkeypatch.setenv("DOCKER_HOST", f"tcp://{closed_port}")
    assert await async_docker_available(5.0) is False


async def test_ollama_models_come_from_the_server_at_ollama_host(
    engine: str, closed_port: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OLLAMA_HOST", f"http://{engine}")
    assert await async_ollama_models(5.0) == ("llama3.2:1b", "qwen3:0.6b")

    monkeypatch.setenv("OLLAMA_HOST", f"http://{closed_port}")
    assert await async_ollama_models(5.0) == ()


async def test_a_stale_fingerprint_is_probed_again_in_the_background() -> None:
    now = [0.0]
    found = [Fingerprint(docker_available=True), Fingerprint(ollama_models=("m",))]
    probes: list[Fingerprint] = []

    async def probe() -> Fingerprint:
        probes.append(found[len(probes)])
        return probes[-1]

    machine = MachineProbe(max_age=timedelta(minutes=5), probe=probe, clock=lambda: now[0])
    assert await machine.async_refresh() == found[0]
    now[0] = 299.0
    assert machine.current() == found[0]
    await asyncio.sleep(0)
    assert len(probes) == 1  # fresh enough: not probed again

    now[0] = 300.0
    assert machine.current() == found[0]  # at once, as it was; a probe starts meanwhile
    for _ in range(10):
        await asyncio.sleep(0)
    assert machine.current() == found[1]
    assert len(probes) == 2
    await machine.aclose()


async def test_info_reports_what_the_node_found(
    engine: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nvidia_smi(tmp_path / "bin", f"printf '{SMI_OUTPUT}'")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    monkeypatch.setenv("DOCKER_HOST", f"tcp://{engine}")
    monkeypatch.setenv("OLLAMA_HOST", f"http://{engine}")
    node = NodeAgent(
        NodeSettings(standalone=True, listen="127.0.0.1:0", token="t", guard=False, cpus=3)
    )
    await node.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{node.port}") as channel:
            info = await node_pb2_grpc.NodeStub(channel).Info(
                node_pb2.InfoRequest(), metadata=(("authorization", "Bearer t"),), timeout=5
            )
    finally:
        await asyncio.wait_for(node.stop(), 20)

    assert [(g.name, g.memory_mb) for g in info.detected_gpus] == [
        ("NVIDIA A100-SXM4-80GB", 81920),
        ("NVIDIA GeForce RTX 4090", 24564),
    ]
    assert info.docker_available
    assert list(info.ollama_models) == ["llama3.2:1b", "qwen3:0.6b"]
    assert info.resources.cpus == 3
    assert info.python_version
