"""The node's Docker engine: its connection, how its failures count, calls that block for as
long as a container runs, and the removal of containers earlier nodes left behind."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import docker
import psutil
import requests
from docker.errors import APIError, DockerException, NotFound
from docker.models.containers import Container

from shoal.config import NodeSettings
from shoal.node.executors.base import InfrastructureError, Outcome
from shoal.node.executors.docker.sandbox import (
    HOST,
    LABEL_HOST,
    LABEL_MANAGED,
    LABEL_NODE,
    LABEL_PID,
    LABEL_TASK,
)
from shoal.node.executors.secretfiles import reap_secret_files

__all__ = [
    "DockerEngine",
    "EngineError",
    "engine_failure",
    "in_thread",
    "is_task_error",
    "post",
    "remove",
]

_log = logging.getLogger("shoal.node.docker")
_T = TypeVar("_T")
_ENGINE_TIMEOUT = 10  # seconds for one call to the engine (streams and waits have none)


class EngineError(Exception):
    """The engine failed in a way its API did not map to a status (e.g. a failed pull)."""


def engine_failure(err: Exception, doing: str) -> Outcome:
    """A failure of the engine itself (unreachable, 5xx): another node may run the task."""
    detail = err.explanation if isinstance(err, APIError) and err.explanation else err
    return InfrastructureError(f"docker engine failed while {doing}: {detail}").outcome()


# What a registry says, in a pull's stream, of an image that does not exist (or that the
# node may not pull): the task named it, so it is the task's failure, not the engine's.
_NO_SUCH_IMAGE = ("not found", "manifest unknown", "repository does not exist", "access denied")


def is_task_error(err: Exception) -> bool:
    """Whether the engine refused what the task asked (4xx), rather than failing (5xx)."""
    if isinstance(err, EngineError):
        return any(words in str(err).lower() for words in _NO_SUCH_IMAGE)
    return isinstance(err, APIError) and err.is_client_error()


def post(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    """Hand a thread's result to the loop; nothing to do once the loop is closed."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)


def in_thread(name: str, call: Callable[[], _T]) -> asyncio.Future[_T]:
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
            post(loop, settle, None, err)
        else:
            post(loop, settle, result, None)

    threading.Thread(target=target, name=name, daemon=True).start()
    return future


class DockerEngine:
    """One client of the engine, connected at first use and shared by the node's tasks."""

    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self._client: docker.DockerClient | None = None
        self._connecting = asyncio.Lock()

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

    async def client(self) -> docker.DockerClient:
        async with self._connecting:
            if self._client is None:
                self._client = await asyncio.to_thread(self._connect)
            return self._client

    async def async_available(self) -> bool:
        """Whether the engine answers; if so, this node's leftover containers are removed."""
        try:
            client = await self.client()
        except (DockerException, requests.RequestException) as err:
            _log.warning("no Docker engine answers: %s", err)
            return False
        await self.reap(client)
        await asyncio.to_thread(reap_secret_files)
        return True

    async def reap(self, client: docker.DockerClient) -> None:
        """Remove the containers earlier runs of nodes on this machine left (they stopped
        without cleaning up): those of this node's configured id, and those whose node process
        is gone. Containers of other nodes that run, on this engine, are left alone."""
        node_id = self.settings.node_id
        try:
            ours = await asyncio.to_thread(
                client.containers.list,
                all=True,
                filters={"label": [f"{LABEL_MANAGED}=1", f"{LABEL_HOST}={HOST}"]},
            )
            leftovers = [c for c in ours if left_behind(c.labels, node_id)]
            for container in leftovers:
                task_id = container.labels.get(LABEL_TASK, "")
                _log.info("node=%s task=%s removing a leftover container", node_id, task_id)
                await asyncio.to_thread(remove, container)
        except (DockerException, requests.RequestException) as err:
            _log.warning("node=%s cannot remove leftover containers: %s", node_id, err)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.close)


def left_behind(labels: Mapping[str, str], node_id: str) -> bool:
    """Whether a container of this machine belongs to no running node: to this node's id, or
    to a node process that is gone."""
    if node_id and labels.get(LABEL_NODE) == node_id:
        return True
    pid = labels.get(LABEL_PID, "")
    return pid.isdigit() and int(pid) != os.getpid() and not psutil.pid_exists(int(pid))


def remove(container: Container) -> None:
    with contextlib.suppress(NotFound):
        container.remove(force=True, v=True)
