"""A container's secrets as files: written to the node's tmpfs, bind-mounted read-only at
SECRETS_DIR, so that no value is in the container's environment (`docker inspect` shows it)
nor on a disk."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import psutil

__all__ = [
    "SECRETS_DIR",
    "file_owner",
    "mount_source",
    "reap_secret_files",
    "remove_secret_files",
    "unusable_file_names",
    "write_secret_files",
]

SECRETS_DIR = "/run/secrets"
"""Where a container finds its secrets: one file per secret, named as its variable."""

_TMPFS = Path("/dev/shm")  # memory only, on every Linux
_PREFIX = "shoal-secrets-"  # then the node's pid, "-", and a random part
_FILES = "files"  # the directory mounted, inside one only root may enter


def unusable_file_names(names: list[str]) -> list[str]:
    """The names that cannot be a file's name in one directory."""
    return [n for n in names if not n or n in (".", "..") or "/" in n or "\0" in n]


def file_owner(docker_user: str) -> tuple[int, int] | None:
    """The uid and gid that `docker_user` ("uid[:gid]") names; None for a name or none."""
    user, _, group = docker_user.partition(":")
    if not user.isdigit() or (group and not group.isdigit()):
        return None
    return int(user), int(group or 0)


def write_secret_files(secrets: Mapping[str, str], owner: tuple[int, int] | None) -> Path:
    """A new directory on the node's tmpfs that only root may enter, holding the directory to
    mount: a file per secret, readable by `owner` only (mode 0400), or by anyone in the
    container when its user is not known by number (owned by root, 0444).

    Blocks: call it in a thread. Give what it returns to `remove_secret_files`.
    """
    outer = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=_TMPFS))
    try:
        files = outer / _FILES
        files.mkdir(mode=0o700)
        for name, value in secrets.items():
            path = files / name
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            fd = os.open(path, flags, 0o400 if owner else 0o444)
            with os.fdopen(fd, "wb") as f:
                f.write(value.encode())
                if owner:
                    os.fchown(f.fileno(), *owner)
        if owner:
            os.chown(files, *owner)
        files.chmod(0o500 if owner else 0o555)
    except BaseException:
        remove_secret_files(outer)
        raise
    return outer


def mount_source(written: Path) -> str:
    """The directory to mount at SECRETS_DIR, of what `write_secret_files` returned."""
    return str(written / _FILES)


def remove_secret_files(written: Path) -> None:
    """Remove what `write_secret_files` wrote (blocks)."""
    shutil.rmtree(written, ignore_errors=True)


def reap_secret_files() -> None:
    """Remove the secret files that node processes of this machine left when they died."""
    with contextlib.suppress(OSError):
        for path in _TMPFS.glob(f"{_PREFIX}*-*"):
            pid = path.name.removeprefix(_PREFIX).partition("-")[0]
            if pid.isdigit() and int(pid) != os.getpid() and not psutil.pid_exists(int(pid)):
                remove_secret_files(path)
