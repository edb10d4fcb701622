"""`docker`: a DockerSpec run as a sandboxed container of the node's Docker engine.

Every container is sandboxed unless the node's operator allows more: no network
(`network_mode="none"`; a task may ask for one only where `docker_allow_network` is set), a
read-only root, a tmpfs at /tmp (`docker_tmpfs_mb`, writable by anyone), no capabilities,
no-new-privileges, the unprivileged `docker_user`, and limits on memory (no swap), CPUs and
processes: the task's own where it sets them, within the node's (`docker_memory_mb`,
`docker_cpus`, `docker_pids`), else the node's. Host paths are mounted only where the operator
lists them (`docker_mounts`): never at a task's request.

The task's secrets are files, not environment: one per secret at /run/secrets/<variable>,
readable only by `docker_user` (when it is a uid), on the node's tmpfs (/dev/shm, so the engine
must be on the node's machine), bind-mounted read-only and removed with the container.

Input files (`files`) must be absolute paths under /work: they are written into a scratch
volume mounted at /work before the container starts, and removed with it (a read-only root
leaves no other place to put them before the start). They and their directories belong to
root, so the task's unprivileged user reads them and cannot change them: it writes to /tmp.

The image must be on the node unless the task's pull policy says otherwise (unset means
never). Output streams as it comes, redacted; the container is removed however the task ends.
Containers carry the labels `shoal.managed=1`, `shoal.task`, `shoal.node` (the node's
configured `node_id`), `shoal.host` and `shoal.pid`: a node that starts removes the leftovers
of its own id and of node processes of its machine that are gone.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import io
import logging
import os
import posixpath
import socket
import tarfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import docker
import psutil
import requests
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.models.containers import Container
from docker.types import Mount

from shoal._output import output_chunk, set_result_text
from shoal.config import NodeSettings
from shoal.node.executors.base import (
    ExecutionContext,
    Executor,
    InfrastructureError,
    Outcome,
    TaskError,
    register,
)
from shoal.node.executors.process import _Tail
from shoal.node.executors.secretfiles import (
    SECRETS_DIR,
    file_owner,
    mount_source,
    reap_secret_files,
    remove_secret_files,
    unusable_file_names,
    write_secret_files,
)
from shoal.v1 import task_pb2

__all__ = [
    "FILES_DIR",
    "LABEL_HOST",
    "LABEL_MANAGED",
    "LABEL_NODE",
    "LABEL_PID",
    "LABEL_TASK",
    "DockerExecutor",
]

_log = logging.getLogger("shoal.node.docker")
_T = TypeVar("_T")

LABEL_MANAGED = "shoal.managed"  # "1" on every container a node starts
LABEL_TASK = "shoal.task"  # the task's id
LABEL_NODE = "shoal.node"  # the node's configured id ("" when it has none)
LABEL_HOST = "shoal.host"  # the machine of the node that started it
LABEL_PID = "shoal.pid"  # ... and the node's process id there
_HOST = socket.gethostname()
FILES_DIR = "/work"  # where input files go: a volume of the container's own

_ENGINE_TIMEOUT = 10  # seconds for one call to the engine (streams and waits have none)
_HELD_BYTES = 1 << 20  # output a reader may get ahead of the loop before it waits
_FILE_MODE = 0o644
_DIR_MODE = 0o755
_COMMAND_NOT_FOUND = 127
_EXIT_MEANINGS = {  # by convention, of shells and of the engine alike
    _COMMAND_NOT_FOUND: "exit 127: a command was not found",
    126: "exit 126: a command could not be executed",
}


class _EngineError(Exception):
    """The engine failed in a way its API did not map to a status (e.g. a failed pull)."""


def _failed(error: str, *, exit_code: int = 0) -> Outcome:
    """The task asked for what it cannot have here."""
    return TaskError(error, exit_code=exit_code).outcome()


def _engine_failure(err: Exception, doing: str) -> Outcome:
    """A failure of the engine itself (unreachable, 5xx): another node may run the task."""
    detail = err.explanation if isinstance(err, APIError) and err.explanation else err
    return InfrastructureError(f"docker engine failed while {doing}: {detail}").outcome()


# What a registry says, in a pull's stream, of an image that does not exist (or that the
# node may not pull): the task named it, so it is the task's failure, not the engine's.
_NO_SUCH_IMAGE = ("not found", "manifest unknown", "repository does not exist", "access denied")


def _is_task_error(err: Exception) -> bool:
    """Whether the engine refused what the task asked (4xx), rather than failing (5xx)."""
    if isinstance(err, _EngineError):
        return any(words in str(err).lower() for words in _NO_SUCH_IMAGE)
    return isinstance(err, APIError) and err.is_client_error()


def _post(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    """Hand a thread's result to the loop; nothing to do once the loop is closed."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)


def _in_thread(name: str, call: Callable[[], _T]) -> asyncio.Future[_T]:
    """Run a call that may block for as long as a container runs, in a daemon thread of its own.

    Such calls would starve the loop's default executor (a few threads, shared by the node);
    a daemon thread never holds up the process's exit either.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def settle(result: _T | None, error: BaseException | None) -> None:
        if future.done():
            return  # the run was cancelled meanwhile
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result = call()
        except BaseException as err:
            _post(loop, settle, None, err)
        else:
            _post(loop, settle, result, None)

    threading.Thread(target=target, name=name, daemon=True).start()
    return future


class _Output:
    """One output stream of a container: bytes from its reader thread, decoded, redacted,
    emitted and kept on the loop.

    What arrives while the loop is busy is emitted as one chunk (a container logs line by
    line: a chunk per line would flood the node), and a reader that gets `_HELD_BYTES` ahead
    of the loop waits for it.
    """

    def __init__(self, stream: int, ctx: ExecutionContext) -> None:
        self.stream = stream
        self.ctx = ctx
        self.tail = _Tail(ctx.output_tail_bytes)
        self.closed = False
        self._loop = asyncio.get_running_loop()
        # Bytes that are not UTF-8 stay bytes (as lone surrogates) through to the wire.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self._redactor = ctx.redactor.stream()
        self._lock = threading.Lock()
        self._held: list[bytes] = []  # arrived, not yet taken by the loop
        self._held_bytes = 0
        self._taken = threading.Event()

    def push(self, data: bytes) -> None:
        """From the reader thread: more of the stream."""
        with self._lock:
            self._held.append(data)
            self._held_bytes += len(data)
            first = len(self._held) == 1
        if first:
            _post(self._loop, self._take)
        while self._held_bytes > _HELD_BYTES and not self.closed and not self._loop.is_closed():
            self._taken.wait(0.1)
            self._taken.clear()

    def _take(self) -> None:
        with self._lock:
            held, self._held, self._held_bytes = self._held, [], 0
        self._taken.set()
        if held and not self.closed:
            self._emit(self._redactor.feed(self._decoder.decode(b"".join(held))))

    def close(self) -> None:
        """The stream ended: emit what was held back. Nothing is taken after this."""
        if not self.closed:
            self._take()
            self._emit(self._redactor.feed(self._decoder.decode(b"", final=True)))
            self._emit(self._redactor.flush())
            self.abandon()

    def abandon(self) -> None:
        """The run ended early (cancelled, failed): what still arrives is dropped."""
        self.closed = True
        self._taken.set()  # a reader waiting for room goes on, to its end

    def _emit(self, text: str) -> None:
        if text:
            self.tail.add(text)  # redacted already, so the result's tail is too
            self.ctx.emit(output_chunk(self.stream, text))


def _follow(container: Container, output: _Output, *, stdout: bool) -> asyncio.Future[None]:
    """Follow one of the container's log streams until it ends (the container stopped)."""

    def read() -> None:
        try:
            logs = container.logs(stream=True, follow=True, stdout=stdout, stderr=not stdout)
            try:
                for data in logs:
                    output.push(data)
            finally:
                logs.close()
        except (DockerException, requests.RequestException):
            raise
        except Exception as err:  # the raw stream's own (urllib3, socket) errors
            raise _EngineError(f"reading the container's output: {err}") from err

    which = "stdout" if stdout else "stderr"
    return _in_thread(f"shoal-docker-{which}-{container.short_id}", read)


def _files_archive(files: Mapping[str, bytes]) -> bytes:
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


def _bad_file_path(path: str) -> bool:
    normal = posixpath.normpath(path)
    return normal != path or not path.startswith(FILES_DIR + "/") or "\0" in path


def _left_behind(labels: Mapping[str, str], node_id: str) -> bool:
    """Whether a container of this machine belongs to no running node: to this node's id, or
    to a node process that is gone."""
    if node_id and labels.get(LABEL_NODE) == node_id:
        return True
    pid = labels.get(LABEL_PID, "")
    return pid.isdigit() and int(pid) != os.getpid() and not psutil.pid_exists(int(pid))


@register
class DockerExecutor(Executor):
    name = "docker"

    def __init__(self, settings: NodeSettings) -> None:
        super().__init__(settings)
        self._client: docker.DockerClient | None = None
        self._connecting = asyncio.Lock()

    # -- the engine ------------------------------------------------------------------------

    def _connect(self) -> docker.DockerClient:
        """A client of the engine DOCKER_HOST names (else the local socket) that answered a ping."""
        # Each running container holds a few connections (its two log streams, its wait).
        pool = 4 * self.settings.slots + 4
        client = docker.from_env(timeout=_ENGINE_TIMEOUT, max_pool_size=pool)
        try:
            client.ping()
        except BaseException:
            client.close()
            raise
        return client

    async def _engine(self) -> docker.DockerClient:
        async with self._connecting:
            if self._client is None:
                self._client = await asyncio.to_thread(self._connect)
            return self._client

    async def async_available(self) -> bool:
        """Whether the engine answers; if so, this node's leftover containers are removed."""
        try:
            client = await self._engine()
        except (DockerException, requests.RequestException) as err:
            _log.warning("no Docker engine answers: %s", err)
            return False
        await self._reap(client)
        await asyncio.to_thread(reap_secret_files)
        return True

    async def _reap(self, client: docker.DockerClient) -> None:
        """Remove the containers earlier runs of nodes on this machine left (they stopped
        without cleaning up): those of this node's configured id, and those whose node process
        is gone. Containers of other nodes that run, on this engine, are left alone."""
        node_id = self.settings.node_id
        try:
            ours = await asyncio.to_thread(
                client.containers.list,
                all=True,
                filters={"label": [f"{LABEL_MANAGED}=1", f"{LABEL_HOST}={_HOST}"]},
            )
            leftovers = [c for c in ours if _left_behind(c.labels, node_id)]
            for container in leftovers:
                task_id = container.labels.get(LABEL_TASK, "")
                _log.info("node=%s task=%s removing a leftover container", node_id, task_id)
                await asyncio.to_thread(_remove, container)
        except (DockerException, requests.RequestException) as err:
            _log.warning("node=%s cannot remove leftover containers: %s", node_id, err)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.close)

    # -- a task ----------------------------------------------------------------------------

    def _refusal(self, spec: task_pb2.DockerSpec) -> str:
        """Why this node will not run `spec` as asked (nothing changed yet), or ""."""
        s = self.settings
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
        bad = sorted(path for path in spec.files if _bad_file_path(path))
        if bad:
            return (
                f"docker: input files go under {FILES_DIR}/ (absolute, normalised paths),"
                f" not {', '.join(repr(p) for p in bad[:3])}"
            )
        return ""

    async def run(self, spec: task_pb2.TaskSpec, ctx: ExecutionContext) -> Outcome:
        d = spec.docker
        refusal = self._refusal(d)
        bad = unusable_file_names(list(ctx.secret_env))
        if bad:
            refusal = f"docker: secrets become files in {SECRETS_DIR}, and {bad[0]!r} cannot"
        if refusal:
            return _failed(refusal)
        secrets: Path | None = None
        if ctx.secret_env:
            owner = file_owner(self.settings.docker_user)
            try:
                secrets = await asyncio.to_thread(write_secret_files, ctx.secret_env, owner)
            except OSError as err:
                why = err.strerror or err
                return InfrastructureError(f"cannot write the task's secret files: {why}").outcome()
        doing = "connecting"
        try:
            client = await self._engine()
            doing = f"providing image {d.image}"
            missing = await self._image(client, d, ctx)
            if missing is not None:
                return missing
            doing = "creating the container"
            container = await self._create(client, d, ctx, secrets)
            try:
                doing = "running the container"
                return await self._run(container, d, ctx)
            finally:
                # However it ended (cancel and timeout included), the container goes.
                await self._discard(container, ctx)
        except (DockerException, requests.RequestException, _EngineError) as err:
            if _is_task_error(err):
                explanation = err.explanation if isinstance(err, APIError) else err
                return _failed(f"docker: the engine refused {doing}: {explanation}")
            return _engine_failure(err, doing)
        finally:
            if secrets is not None:
                await asyncio.shield(asyncio.to_thread(remove_secret_files, secrets))

    async def _image(
        self, client: docker.DockerClient, d: task_pb2.DockerSpec, ctx: ExecutionContext
    ) -> Outcome | None:
        """Make sure the image is here as the pull policy says; an outcome when it cannot be."""
        if d.pull != task_pb2.PULL_POLICY_ALWAYS:
            try:
                await asyncio.to_thread(client.images.get, d.image)
                return None
            except ImageNotFound:
                if d.pull != task_pb2.PULL_POLICY_IF_MISSING:
                    return _failed(f"image {d.image} is not on this node (pull policy never)")
        ctx.emit(
            task_pb2.OutputChunk(
                stream=task_pb2.OUTPUT_STREAM_PROGRESS, data=f"pulling image {d.image}\n"
            )
        )

        def pull() -> None:
            for event in client.api.pull(d.image, stream=True, decode=True):
                if isinstance(event, dict) and event.get("error"):
                    raise _EngineError(f"pulling {d.image}: {event['error']}")

        await _in_thread(f"shoal-docker-pull-{ctx.task_id}", pull)
        ctx.emit(
            task_pb2.OutputChunk(
                stream=task_pb2.OUTPUT_STREAM_PROGRESS, data=f"pulled image {d.image}\n"
            )
        )
        return None

    async def _create(
        self,
        client: docker.DockerClient,
        d: task_pb2.DockerSpec,
        ctx: ExecutionContext,
        secrets: Path | None = None,
    ) -> Container:
        """The task's container, created (not started) with the sandbox and limits applied,
        and the `secrets` files (of `write_secret_files`) mounted."""
        s = self.settings
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
                LABEL_HOST: _HOST,
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
        creating = asyncio.ensure_future(
            asyncio.to_thread(client.containers.create, d.image, **options)
        )
        try:
            return await asyncio.shield(creating)
        except asyncio.CancelledError:
            # The engine may be making it right now: once it is made, it goes.
            with contextlib.suppress(Exception):
                await self._discard(await creating, ctx)
            raise

    async def _run(
        self, container: Container, d: task_pb2.DockerSpec, ctx: ExecutionContext
    ) -> Outcome:
        """Start the created container, stream its output, and tell how it ended."""
        if d.files:
            await asyncio.to_thread(container.put_archive, FILES_DIR, _files_archive(d.files))
        try:
            await asyncio.to_thread(container.start)
        except APIError as err:
            if not _is_task_error(err):
                raise
            # The command could not be run (not found, not executable): the engine says which
            # exit code it stands for.
            await asyncio.to_thread(container.reload)
            code = int(container.attrs.get("State", {}).get("ExitCode") or _COMMAND_NOT_FOUND)
            return _failed(f"docker: cannot start the command: {err.explanation}", exit_code=code)
        out = _Output(task_pb2.OUTPUT_STREAM_STDOUT, ctx)
        err_out = _Output(task_pb2.OUTPUT_STREAM_STDERR, ctx)
        streams = (_follow(container, out, stdout=True), _follow(container, err_out, stdout=False))
        waiting = _in_thread(f"shoal-docker-wait-{container.short_id}", container.wait)
        try:
            status, *_ = await asyncio.gather(waiting, *streams)
        except BaseException:
            for output in (out, err_out):
                output.abandon()
            for future in (waiting, *streams):
                future.cancel()  # their threads end once the container is removed
            raise
        out.close()
        err_out.close()
        await asyncio.to_thread(container.reload)
        code = int(status.get("StatusCode", -1))
        result = task_pb2.TaskResult(exit_code=code)
        set_result_text(result, "stdout", out.tail.text())
        set_result_text(result, "stderr", err_out.tail.text())
        if container.attrs.get("State", {}).get("OOMKilled"):
            limit = d.memory_mb or self.settings.docker_memory_mb
            result.error = f"out of memory: the container went over its {limit} MB limit"
            return Outcome(task_pb2.TASK_STATE_FAILED, result)
        result.error = _EXIT_MEANINGS.get(code, "")
        state = task_pb2.TASK_STATE_SUCCEEDED if code == 0 else task_pb2.TASK_STATE_FAILED
        return Outcome(state, result)

    async def _discard(self, container: Container, ctx: ExecutionContext) -> None:
        """Kill and remove the container and its files volume; a cancel does not stop that."""
        try:
            await asyncio.shield(asyncio.to_thread(_remove, container))
        except (DockerException, requests.RequestException) as err:
            _log.warning(
                "node=%s task=%s cannot remove container %s: %s",
                self.settings.node_id,
                ctx.task_id,
                container.short_id,
                err,
            )


def _remove(container: Container) -> None:
    with contextlib.suppress(NotFound):
        container.remove(force=True, v=True)
