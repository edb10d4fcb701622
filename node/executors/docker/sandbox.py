"""The sandbox of a docker task: what a node refuses, and the options of its container."""

from __future__ import annotations

import io
import os
import posixpath
import socket
import tarfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from docker.types import Mount

from shoal.config import NodeSettings
from shoal.node.executors.base import ExecutionContext
from shoal.node.executors.secretfiles import SECRETS_DIR, mount_source
from shoal.v1 import task_pb2

__all__ = [
    "FILES_DIR",
    "HOST",
    "LABEL_HOST",
    "LABEL_MANAGED",
    "LABEL_NODE",
    "LABEL_PID",
    "LABEL_TASK",
    "container_options",
    "files_archive",
    "refusal",
]

LABEL_MANAGED = "shoal.managed"  # "1" on every container a node starts
LABEL_TASK = "shoal.task"  # the task's id
LABEL_NODE = "shoal.node"  # the node's configured id ("" when it has none)
LABEL_HOST = "shoal.host"  # the machine of the node that started it
LABEL_PID = "shoal.pid"  # ... and the node's process id there
HOST = socket.gethostname()
FILES_DIR = "/work"  # where input files go: a volume of the container's own
_FILE_MODE = 0o644
_DIR_MODE = 0o755


def refusal(spec: task_pb2.DockerSpec, s: NodeSettings) -> str:
    """Why this node will not run `spec` as asked (nothing changed yet), or ""."""
    if not spec.image:
        return "docker: no image given"
    if spec.network and not s.docker_allow_network:
        return (
            "docker: the task asks for a network, and this node's operator allows none"
            " (docker_allow_network): place it with labels on a node that does"
        )
    if spec.memory_mb > s.docker_memory_mb:
        return (
            f"docker: the task asks for {spec.memory_mb} MB of memory;"
            f" this node allows at most {s.docker_memory_mb} MB (docker_memory_mb)"
        )
    if not 0 <= spec.cpus <= s.docker_cpus:  # NaN too
        return (
            f"docker: the task asks for {spec.cpus:g} CPUs;"
            f" this node allows at most {s.docker_cpus:g} (docker_cpus)"
        )
    if spec.pids > s.docker_pids:
        return (
            f"docker: the task asks for {spec.pids} processes;"
            f" this node allows at most {s.docker_pids} (docker_pids)"
        )
    bad = sorted(path for path in spec.files if bad_file_path(path))
    if bad:
        return (
            f"docker: input files go under {FILES_DIR}/ (absolute, normalised paths),"
            f" not {', '.join(repr(p) for p in bad[:3])}"
        )
    return ""


def container_options(
    d: task_pb2.DockerSpec, ctx: ExecutionContext, s: NodeSettings, secrets: Path | None
) -> dict[str, Any]:
    """The keyword arguments that create the task's container with the sandbox and limits
    applied, and the `secrets` files (of `write_secret_files`) mounted."""
    memory = f"{d.memory_mb or s.docker_memory_mb}m"
    # Files cannot go onto a read-only root: into a volume of its own, removed with it.
    mounts = [Mount(FILES_DIR, None, type="volume")] if d.files else []
    if secrets is not None:
        mounts.append(Mount(SECRETS_DIR, mount_source(secrets), type="bind", read_only=True))
    options: dict[str, Any] = {
        "command": list(d.command) or None,
        "environment": dict(d.env),  # secrets are files: the engine shows its environment
        "working_dir": d.workdir or None,
        "user": s.docker_user or None,
        "labels": {
            LABEL_MANAGED: "1",
            LABEL_TASK: ctx.task_id,
            LABEL_NODE: s.node_id,
            LABEL_HOST: HOST,
            LABEL_PID: str(os.getpid()),
        },
        "network_mode": None if d.network else "none",
        "read_only": True,
        "tmpfs": {"/tmp": f"size={s.docker_tmpfs_mb}m,mode=1777"},
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "mem_limit": memory,
        "memswap_limit": memory,  # the same: no swap
        "nano_cpus": round((d.cpus or s.docker_cpus) * 1e9),
        "pids_limit": d.pids or s.docker_pids,
        "volumes": list(s.docker_mounts) or None,
        "mounts": mounts or None,
    }
    return options


def files_archive(files: Mapping[str, bytes]) -> bytes:
    """A tar of `files` (paths under FILES_DIR) and their directories, relative to FILES_DIR."""
    buffer = io.BytesIO()
    now = time.time()
    dirs: set[str] = set()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(files):
            relative = posixpath.relpath(path, FILES_DIR)
            parts = relative.split("/")
            for depth in range(1, len(parts)):  # its directories first, owned by root too
                parent = "/".join(parts[:depth])
                if parent not in dirs:
                    dirs.add(parent)
                    info = tarfile.TarInfo(parent)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, _DIR_MODE, now
                    tar.addfile(info)
            info = tarfile.TarInfo(relative)
            info.size, info.mode, info.mtime = len(files[path]), _FILE_MODE, now
            tar.addfile(info, io.BytesIO(files[path]))
    return buffer.getvalue()


def bad_file_path(path: str) -> bool:
    normal = posixpath.normpath(path)
    return normal != path or not path.startswith(FILES_DIR + "/") or "\0" in path
