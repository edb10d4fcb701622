"""Who shell and python tasks run as (`run_as`), and the directory each task gets.

Under "auto" on a node run as root, each running task has a uid of its own, unique on the
machine while it runs (a lock file per uid), so tasks can read neither each other's files nor
each other's environment (`/proc/PID/environ`: secrets). The uids need no account.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import grp
import logging
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from shoal.errors import InvalidArgument

__all__ = ["TASK_UID_BASE", "Leased", "TaskUser", "TaskUsers"]

TASK_UID_BASE = 1_900_000_000
"""run_as = "auto": task uids count up from here (well above any account's or subuid range's)."""

_log = logging.getLogger("shoal.node")
_NODE = frozenset({"", "node"})
_AUTO = "auto"
_HELD: set[int] = set()  # uids this process leases now (the lock files hold them machine-wide)


# What the loader and C library of a process act on, unless it is setuid (glibc's "unsecure"
# variables): code to load (LD_PRELOAD, GCONV_PATH) and files to read. setpriv runs as root
# until it switches: a task's own are set after the switch.
_ROOT_UNSAFE = frozenset(
    {
        "GCONV_PATH",
        "GETCONF_DIR",
        "GLIBC_TUNABLES",
        "HOSTALIASES",
        "LOCALDOMAIN",
        "LOCPATH",
        "NIS_PATH",
        "NLSPATH",
        "RESOLV_HOST_CONF",
        "RES_OPTIONS",
        "TMPDIR",
        "TZDIR",
    }
)


def root_unsafe(name: str) -> bool:
    """Whether a process run as root must not start with the task's `name` variable."""
    return name in _ROOT_UNSAFE or name.startswith(("LD_", "MALLOC_"))


@dataclass(frozen=True)
class TaskUser:
    """A user other than the node's: tasks run with its uid and gid, and no other group."""

    uid: int
    gid: int
    name: str  # its name, or its uid when it has none
    setpriv: str = "setpriv"  # util-linux's, which drops to this user before it execs
    env: str = "env"  # coreutils', which sets what may be set only after the switch

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

    def command(
        self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None
    ) -> tuple[list[str], dict[str, str]]:
        """`argv` run as this user in `cwd` (None: where it starts), and the environment to
        start it with (`env`). What the task chose that a process run as root must not act on
        is done after the switch, by env(1): its directory (entered as the task's user) and
        the variables `root_unsafe` names (unless the node has them itself).
        ValueError for a command whose name env(1) would take for a variable (it holds '=')."""
        later = {k: v for k, v in env.items() if root_unsafe(k) and os.environ.get(k) != v}
        if not later and not cwd:
            return self.argv(argv), dict(env)
        if "=" in argv[0]:
            raise ValueError(
                f"{argv[0]!r}: a command whose name holds '=' runs with no cwd and no LD_*"
                " or other variable the C library reads as the node switches users"
            )
        start = {k: v for k, v in env.items() if k not in later}
        chdir = ["--chdir", cwd] if cwd else []
        pairs = [f"{k}={v}" for k, v in later.items()]
        return self.argv([self.env, *chdir, "--", *pairs, *argv]), start


@dataclass(frozen=True)
class Leased:
    """A task's user and directory; `reap` (a uid of the task's own only) kills every process
    of it, which may hold the task's pipes open after its own process ended."""

    user: TaskUser
    home: Path
    reap: Callable[[], Awaitable[None]] | None


class TaskUsers:
    """The user of each task, by the `run_as` setting: the node's own (`lease` gives None), one
    named user, or under "auto" on a node run as root, a uid of its own per running task.

    Raises InvalidArgument for a user or group this machine does not know, and for another
    user than the node's when the node cannot switch users (it does not run as root).
    """

    def __init__(self, run_as: str) -> None:
        self.auto = run_as == _AUTO
        self.fixed: TaskUser | None = None
        self._setpriv = ""
        if run_as in _NODE or (self.auto and os.geteuid() != 0):
            return
        setpriv = _util_linux_setpriv()
        if setpriv is None:
            if self.auto:
                _log.warning("tasks run as root: setpriv (util-linux) is missing to switch users")
                self.auto = False
                return
            raise InvalidArgument(f"run_as {run_as!r} needs setpriv (util-linux) on the PATH")
        self._setpriv = setpriv
        self._env = shutil.which("env") or "env"
        if not self.auto:
            self.fixed = _named(run_as, setpriv, self._env)

    @property
    def switching(self) -> bool:
        """Whether tasks run as another user than the node's."""
        return bool(self._setpriv) and (self.auto or self.fixed is not None)

    def give_up(self) -> None:
        """Run tasks as the node's own user from now on."""
        self.auto, self.fixed, self._setpriv = False, None, ""

    @contextlib.asynccontextmanager
    async def lease(self, parent: Path | None) -> AsyncIterator[Leased | None]:
        """The user of one task and a new directory in `parent` (None: the system's temporary
        one) that only it may enter; None when tasks run as the node's user. On the way out
        every process left of a uid of its own is killed, and the directory removed."""
        if not self.switching:
            yield None
            return
        user, lock = (self.fixed, None) if self.fixed else await asyncio.to_thread(self._take)
        assert user is not None
        try:
            home = await asyncio.to_thread(_make_dir, user, parent)
        except BaseException:
            _release(user, lock)
            raise
        own = lock is not None  # a uid of its own: every process of it is the task's
        try:
            yield Leased(user, home, functools.partial(_kill_all, user) if own else None)
        finally:
            try:
                if own:
                    await _kill_all(user)  # what the task left running (a daemon, `sleep &`)
                await asyncio.to_thread(shutil.rmtree, home, True)
            finally:
                _release(user, lock)

    def _take(self) -> tuple[TaskUser, int]:
        """The lowest uid free on this machine, with the descriptor of its held lock file."""
        locks = _lock_dir()
        n = 0
        while True:
            uid = TASK_UID_BASE + n
            n += 1
            if uid in _HELD:
                continue
            fd = os.open(locks / str(uid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)  # another node process of this machine holds it
                continue
            _HELD.add(uid)
            return TaskUser(uid, uid, str(uid), self._setpriv, self._env), fd


def _lock_dir() -> Path:
    base = Path("/run") if os.access("/run", os.W_OK) else Path(tempfile.gettempdir())
    path = base / "shoal-task-uids"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _release(user: TaskUser, lock: int | None) -> None:
    if lock is not None:
        _HELD.discard(user.uid)
        os.close(lock)  # and with it the lock


async def _kill_all(user: TaskUser) -> None:
    """SIGKILL every process of `user` (kill -1 as that user reaches exactly those)."""
    with contextlib.suppress(OSError):
        proc = await asyncio.create_subprocess_exec(
            *user.argv(["kill", "-KILL", "-1"]),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            cwd="/",
        )
        await proc.wait()


def _make_dir(user: TaskUser, parent: Path | None) -> Path:
    path = Path(tempfile.mkdtemp(prefix="shoal-task-", dir=parent))
    try:
        os.chown(path, user.uid, user.gid)
    except OSError:
        path.rmdir()
        raise
    return path


def _util_linux_setpriv() -> str | None:
    """util-linux's setpriv on the PATH; busybox's has no --reuid, so it does not count."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    try:
        version = subprocess.run(
            [setpriv, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return setpriv if "util-linux" in version.stdout else None


def _named(run_as: str, setpriv: str, env: str) -> TaskUser | None:
    """The one user `run_as` names (a name, or uid[:gid]); None when it is the node's own."""
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
    return TaskUser(uid, gid, name, setpriv, env)
