"""A real Docker engine for the tests, and a tiny image that needs no registry.

The engine is the one that answers where DOCKER_HOST (else the local socket) points; failing
that, when running as root with `dockerd` installed, one of the session's own: its data, state
and socket in a temporary directory (no iptables, no bridge), stopped at the end. The image is
made from busybox-static (`docker import` of /bin/busybox and its applets), when missing.

Tests that use `docker_engine` fail, never skip, when no engine can be had.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest
import requests
from docker.errors import DockerException, ImageNotFound

__all__ = ["IMAGE", "DockerEngine", "docker_engine"]

IMAGE = "shoal-test/busybox:1"
"""A busybox rootfs: /bin/sh and the other applets, a world-writable /tmp, nothing else."""

_STARTUP = 30.0  # seconds for a dockerd of our own to answer
_STOP = 20.0  # seconds for it to shut down before it is killed
_BUSYBOX = ("/bin/busybox", "/usr/bin/busybox")


@dataclass(frozen=True)
class DockerEngine:
    client: docker.DockerClient
    host: str | None  # what DOCKER_HOST must say for others to reach it (None: the default)
    image: str = IMAGE


def _answering(host: str | None) -> docker.DockerClient | None:
    """A client of the engine at `host` (None: DOCKER_HOST or the default) if it answers."""
    environment = dict(os.environ)
    if host is not None:
        environment["DOCKER_HOST"] = host
    try:
        client = docker.from_env(timeout=5, environment=environment)
    except (DockerException, requests.RequestException):
        return None
    try:
        client.ping()
    except (DockerException, requests.RequestException):
        client.close()
        return None
    return client


@contextlib.contextmanager
def _own_dockerd() -> Iterator[tuple[str, docker.DockerClient]]:
    """Start a dockerd of the session's own; yields its DOCKER_HOST and a client of it."""
    dockerd = shutil.which("dockerd")
    if os.geteuid() != 0 or dockerd is None:
        pytest.fail(
            "no Docker engine answers (DOCKER_HOST or the local socket), and none can be started"
            f" here ({'dockerd is not installed' if dockerd is None else 'not root'}):"
            " install docker.io and busybox-static, or point DOCKER_HOST at an engine"
        )
    root = Path(tempfile.mkdtemp(prefix="shoal-dockerd-"))  # short: socket paths are capped
    host = f"unix://{root / 'docker.sock'}"
    log_path = root / "dockerd.log"
    argv = [
        dockerd,
        "--host",
        host,
        "--data-root",
        str(root / "data"),
        "--exec-root",
        str(root / "exec"),
        "--pidfile",
        str(root / "dockerd.pid"),
        "--iptables=false",
        "--bridge=none",
    ]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its containerd goes with it if it must be killed
        )
    try:
        deadline = time.monotonic() + _STARTUP
        client = _answering(host)
        while client is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                why = f"exited with {proc.returncode}" if proc.poll() is not None else "is silent"
                pytest.fail(
                    f"the tests' own dockerd {why} after {_STARTUP:g} s:\n"
                    + log_path.read_text(errors="replace")[-3000:]
                )
            # Its socket has no event to wait on: wait on the process (it may die) meanwhile.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.1)
            client = _answering(host)
        try:
            yield host, client
        finally:
            client.close()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # it stops its containers and its containerd
            try:
                proc.wait(_STOP)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        _unmount_under(root)
        shutil.rmtree(root, ignore_errors=True)


def _unmount_under(root: Path) -> None:
    """Unmount what dockerd left mounted under `root` (its netns/default, at times)."""
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts]
    for point in sorted((p for p in points if p.startswith(f"{root}/")), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False, timeout=10)


def _rootfs(busybox: Path) -> bytes:
    """A tar of a root filesystem with busybox and a symlink for each of its applets."""
    applets = subprocess.run(
        [str(busybox), "--list"], capture_output=True, text=True, check=True, timeout=10
    ).stdout.split()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, mode in (("bin", 0o755), ("tmp", 0o1777), ("etc", 0o755), ("work", 0o755)):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)
        tar.add(str(busybox), "bin/busybox")
        for applet in applets:
            if applet != "busybox":
                info = tarfile.TarInfo(f"bin/{applet}")
                info.type, info.linkname = tarfile.SYMTYPE, "busybox"
                tar.addfile(info)
    return buffer.getvalue()


def _ensure_image(client: docker.DockerClient) -> None:
    with contextlib.suppress(ImageNotFound):
        client.images.get(IMAGE)
        return
    busybox = next((Path(p) for p in _BUSYBOX if Path(p).is_file()), None)
    if busybox is None:
        pytest.fail(
            f"no busybox at {' or '.join(_BUSYBOX)} to build {IMAGE}: install busybox-static"
        )
    repository, tag = IMAGE.split(":")
    client.api.import_image_from_data(
        _rootfs(busybox), repository=repository, tag=tag, changes=['CMD ["/bin/sh"]']
    )
    try:
        said = client.containers.run(IMAGE, ["echo", "ready"], remove=True, network_mode="none")
    except DockerException as err:
        pytest.fail(f"{IMAGE} does not run ({err}): is {busybox} static (busybox-static)?")
    assert said == b"ready\n", said


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[DockerEngine]:
    """An engine that answers, with IMAGE on it; the session's own dockerd if need be."""
    with contextlib.ExitStack() as stack:
        client = _answering(None)
        host = None
        if client is None:
            host, client = stack.enter_context(_own_dockerd())
        else:
            stack.callback(client.close)
        _ensure_image(client)
        yield DockerEngine(client, host)
