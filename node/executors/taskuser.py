"""The user shell and python tasks run as (`run_as`), and the directory each task gets."""

from __future__ import annotations

import grp
import logging
import os
import pwd
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shoal.errors import InvalidArgument

__all__ = ["DEDICATED_USER", "TaskUser", "task_user"]

DEDICATED_USER = "shoal-task"
"""The user `run_as = "auto"` picks when it exists (else `nobody`), for a node run as root."""

_log = logging.getLogger("shoal.node")
_NODE = frozenset({"", "node"})
_AUTO = "auto"


@dataclass(frozen=True)
class TaskUser:
    """A user other than the node's: tasks run with its uid and gid, and no other group."""

    uid: int
    gid: int
    name: str  # its name, or its uid when it has none
    setpriv: str = "setpriv"  # util-linux's, which drops to this user before it execs

    def argv(self, argv: Sequence[str]) -> list[str]:
        """`argv`, run as this user with no other group and no way to gain privileges (setuid
        programs stay unprivileged).

        The switch happens in setpriv, after the node's exec: a node process holds gRPC's
        threads, and a child that switched users itself would have to fork (not vfork), which
        runs gRPC's fork handlers in the child, where they crash.
        """
        return [
            self.setpriv,
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--clear-groups",
            "--no-new-privs",
            "--",
            *argv,
        ]

    def make_dir(self, parent: Path | None) -> Path:
        """A new directory in `parent` (None: the system's temporary one) that only this user
        may enter. Blocks: call it in a thread."""
        path = Path(tempfile.mkdtemp(prefix="shoal-task-", dir=parent))
        try:
            os.chown(path, self.uid, self.gid)
        except OSError:
            path.rmdir()
            raise
        return path


def task_user(run_as: str) -> TaskUser | None:
    """The user the `run_as` setting names; None: the node's own.

    Raises InvalidArgument for a user or group this machine does not know, and for another
    user than the node's when the node cannot switch users (it does not run as root).
    """
    if run_as in _NODE:
        return None
    if run_as == _AUTO:
        if os.geteuid() != 0:
            return None
        if shutil.which("setpriv") is None:
            _log.warning(
                "tasks run as root: setpriv (util-linux) is missing, so run_as cannot switch"
            )
            return None
        run_as = DEDICATED_USER if _known(DEDICATED_USER) else "nobody"
    user, _, group = run_as.partition(":")
    try:
        if user.isdigit():
            uid = int(user)
            try:
                entry = pwd.getpwuid(uid)
                gid, name = entry.pw_gid, entry.pw_name
            except KeyError:  # a bare uid needs no entry: its group is its number
                gid, name = uid, user
        else:
            entry = pwd.getpwnam(user)
            uid, gid, name = entry.pw_uid, entry.pw_gid, entry.pw_name
        if group:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise InvalidArgument(f"run_as {run_as!r}: no such user or group here") from None
    if uid == os.geteuid() and not group:
        return None
    if os.geteuid() != 0:
        raise InvalidArgument(
            f"run_as {run_as!r}: only a node running as root can run tasks as another user"
            ' (run_as = "node" runs them as the node\'s own)'
        )
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise InvalidArgument(f"run_as {run_as!r} needs setpriv (util-linux) on the PATH")
    return TaskUser(uid, gid, name, setpriv)


def _known(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
