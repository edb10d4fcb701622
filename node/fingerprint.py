"""What a node finds on its machine: GPUs (nvidia-smi), a Docker engine, an Ollama server's models.

Each probe is bounded by a short timeout and runs off the event loop (a subprocess, a thread,
an async HTTP client); one that fails or hangs counts as "not there", never as an error. The
Docker SDK and the Ollama client are optional: without them, those probes find nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from types import ModuleType
from typing import Any

__all__ = ["Fingerprint", "Gpu", "MachineProbe", "async_probe", "parse_nvidia_smi"]

_log = logging.getLogger("shoal.node")

NVIDIA_SMI = ("nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader")


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_mb: int


@dataclass(frozen=True)
class Fingerprint:
    gpus: tuple[Gpu, ...] = ()
    docker_available: bool = False
    ollama_models: tuple[str, ...] = ()


def parse_nvidia_smi(text: str) -> tuple[Gpu, ...]:
    """GPUs from `nvidia-smi --query-gpu=name,memory.total --format=csv,noheader` output."""
    gpus: list[Gpu] = []
    for line in text.splitlines():
        name, sep, memory = line.rpartition(",")
        if not sep or not name.strip():
            continue
        amount, _, unit = memory.strip().partition(" ")
        try:
            mib = int(float(amount) * (1024 if unit.strip() == "GiB" else 1))
        except ValueError:
            mib = 0  # "[N/A]" and the like
        gpus.append(Gpu(name.strip(), mib))
    return tuple(gpus)


async def async_gpus(timeout: float, command: tuple[str, ...] = NVIDIA_SMI) -> tuple[Gpu, ...]:
    """The machine's NVIDIA GPUs; none when nvidia-smi is missing, fails or hangs."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError:
        return ()  # no nvidia-smi: no NVIDIA GPU to use
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    except TimeoutError:
        _log.warning("%s did not answer within %g s: no GPUs counted", command[0], timeout)
        return ()
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        _log.info("%s failed (exit %d): no GPUs counted", command[0], proc.returncode)
        return ()
    return parse_nvidia_smi(out.decode(errors="replace"))


async def _optional(module: str) -> ModuleType | None:
    """Import an optional package in a thread (importing is slow); None when it is missing."""
    try:
        return await asyncio.to_thread(importlib.import_module, module)
    except ImportError:
        return None


async def async_docker_available(timeout: float) -> bool:
    """Whether a Docker engine answers a ping (the `docker` SDK, in a thread)."""
    docker: Any = await _optional("docker")
    if docker is None:
        return False

    def ping() -> bool:
        client = docker.from_env(timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()

    try:
        async with asyncio.timeout(timeout):
            return await asyncio.to_thread(ping)
    except Exception as err:  # any failure of an optional probe means "no engine here"
        _log.debug("no Docker engine: %s", err)
        return False


async def async_ollama_models(timeout: float) -> tuple[str, ...]:
    """The models of the Ollama server at OLLAMA_HOST (default localhost:11434), if it answers."""
    ollama: Any = await _optional("ollama")
    if ollama is None:
        return ()
    client = ollama.AsyncClient(timeout=timeout)  # it reads OLLAMA_HOST itself
    try:
        async with asyncio.timeout(timeout):
            listed = await client.list()
    except Exception as err:  # any failure of an optional probe means "no server here"
        _log.debug("no Ollama server: %s", err)
        return ()
    finally:
        await client.close()
    return tuple(sorted({m.model for m in listed.models if m.model}))


async def async_probe(timeout: float = 2.0) -> Fingerprint:
    """Probe everything at once, each part within `timeout` seconds."""
    gpus, docker, models = await asyncio.gather(
        async_gpus(timeout), async_docker_available(timeout), async_ollama_models(timeout)
    )
    return Fingerprint(gpus, docker, models)


class MachineProbe:
    """The machine's fingerprint: probed by `async_refresh`, and again in the background when
    `current()` finds it older than `max_age`. `aclose()` ends a probe under way."""

    def __init__(
        self,
        *,
        max_age: timedelta = timedelta(minutes=5),
        probe: Callable[[], Awaitable[Fingerprint]] = async_probe,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_age = max_age.total_seconds()
        self._probe = probe
        self._clock = clock
        self._fingerprint = Fingerprint()
        self._probed_at: float | None = None
        self._refreshing: asyncio.Task[Fingerprint] | None = None

    async def async_refresh(self) -> Fingerprint:
        """Probe now and keep the result."""
        self._fingerprint = await self._probe()
        self._probed_at = self._clock()
        return self._fingerprint

    def current(self) -> Fingerprint:
        """The last fingerprint, at once; starts a new probe when it is stale (on the loop)."""
        stale = self._probed_at is None or self._clock() - self._probed_at >= self._max_age
        if stale and (self._refreshing is None or self._refreshing.done()):
            with contextlib.suppress(RuntimeError):  # no loop runs: it stays as it is
                self._refreshing = asyncio.get_running_loop().create_task(
                    self.async_refresh(), name="shoal-node-probe"
                )
        return self._fingerprint

    async def aclose(self) -> None:
        task, self._refreshing = self._refreshing, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
