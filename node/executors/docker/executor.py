"""The `docker` executor: a task's image, its sandboxed container, its run and its removal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import docker
import requests
from docker.errors import APIError, DockerException, ImageNotFound
from docker.models.containers import Container

from shoal._output import set_result_text
from shoal.config import NodeSettings
from shoal.node.executors.base import (
    ExecutionContext,
    Executor,
    InfrastructureError,
    Outcome,
    TaskError,
    register,
)
from shoal.node.executors.docker.engine import (
    DockerEngine,
    EngineError,
    engine_failure,
    in_thread,
    is_task_error,
    remove,
)
from shoal.node.executors.docker.output import ContainerOutput, follow
from shoal.node.executors.docker.sandbox import FILES_DIR, container_options, files_archive, refusal
from shoal.node.executors.secretfiles import (
    SECRETS_DIR,
    file_owner,
    remove_secret_files,
    unusable_file_names,
    write_secret_files,
)
from shoal.v1 import task_pb2

__all__ = ["DockerExecutor"]

_log = logging.getLogger("shoal.node.docker")
_COMMAND_NOT_FOUND = 127
_EXIT_MEANINGS = {  # by convention, of shells and of the engine alike
    _COMMAND_NOT_FOUND: "exit 127: a command was not found",
    126: "exit 126: a command could not be executed",
}


def _failed(error: str, *, exit_code: int = 0) -> Outcome:
    """The task asked for what it cannot have here."""
    return TaskError(error, exit_code=exit_code).outcome()


@register
class DockerExecutor(Executor):
    name = "docker"

    def __init__(self, settings: NodeSettings) -> None:
        super().__init__(settings)
        self._engine = DockerEngine(settings)

    async def async_available(self) -> bool:
        """Whether the engine answers; if so, this node's leftover containers are removed."""
        return await self._engine.async_available()

    async def aclose(self) -> None:
        await self._engine.aclose()

    async def run(self, spec: task_pb2.TaskSpec, ctx: ExecutionContext) -> Outcome:
        d = spec.docker
        why = refusal(d, self.settings)
        bad = unusable_file_names(list(ctx.secret_env))
        if bad:
            why = f"docker: secrets become files in {SECRETS_DIR}, and {bad[0]!r} cannot"
        if why:
            return _failed(why)
        secrets: Path | None = None
        if ctx.secret_env:
            owner = file_owner(self.settings.docker_user)
            try:
                secrets = await asyncio.to_thread(write_secret_files, ctx.secret_env, owner)
            except OSError as err:
                cause = err.strerror or err
                return InfrastructureError(
                    f"cannot write the task's secret files: {cause}"
                ).outcome()
        doing = "connecting"
        try:
            client = await self._engine.client()
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
        except (DockerException, requests.RequestException, EngineError) as err:
            if is_task_error(err):
                explanation = err.explanation if isinstance(err, APIError) else err
                return _failed(f"docker: the engine refused {doing}: {explanation}")
            return engine_failure(err, doing)
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
                    raise EngineError(f"pulling {d.image}: {event['error']}")

        await in_thread(f"shoal-docker-pull-{ctx.task_id}", pull)
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
        """The task's container, created (not started) in its sandbox."""
        options = container_options(d, ctx, self.settings, secrets)
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
            await asyncio.to_thread(container.put_archive, FILES_DIR, files_archive(d.files))
        try:
            await asyncio.to_thread(container.start)
        except APIError as err:
            if not is_task_error(err):
                raise
            # The command could not be run (not found, not executable): the engine says which
            # exit code it stands for.
            await asyncio.to_thread(container.reload)
            code = int(container.attrs.get("State", {}).get("ExitCode") or _COMMAND_NOT_FOUND)
            return _failed(f"docker: cannot start the command: {err.explanation}", exit_code=code)
        out = ContainerOutput(task_pb2.OUTPUT_STREAM_STDOUT, ctx)
        err_out = ContainerOutput(task_pb2.OUTPUT_STREAM_STDERR, ctx)
        streams = (follow(container, out, stdout=True), follow(container, err_out, stdout=False))
        waiting = in_thread(f"shoal-docker-wait-{container.short_id}", container.wait)
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
            await asyncio.shield(asyncio.to_thread(remove, container))
        except (DockerException, requests.RequestException) as err:
            _log.warning(
                "node=%s task=%s cannot remove container %s: %s",
                self.settings.node_id,
                ctx.task_id,
                container.short_id,
                err,
            )
