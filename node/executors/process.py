"""Running a subprocess for a task: streamed output, a tail kept for the result, group kill."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from shoal._output import output_chunk, set_result_text
from shoal._progress import PROGRESS_FD, PROGRESS_PATH
from shoal.node.executors.base import ExecutionContext, InfrastructureError, Outcome, TaskError
from shoal.node.executors.taskuser import TaskUsers, root_unsafe
from shoal.v1 import task_pb2

__all__ = ["NODE_ONLY_VARIABLES", "run_process", "tasks_environment"]

_CHUNK = 64 << 10
_PROGRESS_LINE = 4096  # the longest progress line read; longer ones are skipped
NODE_ONLY_VARIABLES = frozenset(
    {"OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY"}
)
"""The cloud LLM keys the `llm` executor reads from the node's environment: never a task's."""


class _Tail:
    """The last `limit` characters of a stream."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[str] = []
        self.size = 0

    def add(self, text: str) -> None:
        self.parts.append(text)
        self.size += len(text)
        if self.size > 2 * self.limit:
            joined = "".join(self.parts)[-self.limit :]
            self.parts, self.size = [joined], len(joined)

    def text(self) -> str:
        return "".join(self.parts)[-self.limit :]


async def _pump(
    reader: asyncio.StreamReader, stream: int, ctx: ExecutionContext, tail: _Tail
) -> None:
    """Decode, redact, emit and keep the tail of one output stream until EOF."""
    # Bytes that are not UTF-8 stay bytes (as lone surrogates) through to the wire.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    redactor = ctx.redactor.stream()
    while True:
        data = await reader.read(_CHUNK)
        text = redactor.feed(decoder.decode(data, final=not data))
        if not data:
            text += redactor.flush()
        if text:
            tail.add(text)  # redacted already, so the result's tail is too
            ctx.emit(output_chunk(stream, text))
            await ctx.paced()
        if not data:
            return


async def _exited(pid: int) -> None:
    """Return once process `pid` has exited (a pidfd turns readable then; Linux 5.3+)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # gone, and reaped already
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await exited
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def _feed(writer: asyncio.StreamWriter | None, data: bytes) -> None:
    if writer is None:
        return
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        if data:
            writer.write(data)
            await writer.drain()
        writer.close()


async def run_process(
    argv: Sequence[str],
    ctx: ExecutionContext,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    stdin: bytes = b"",
    users: TaskUsers | None = None,
) -> Outcome:
    """Run argv in its own process group; exit 0 succeeds. Cancel kills the whole group.

    The group is in `ctx.groups` while it runs, so the node can pause and resume it.

    Its environment is the node's (without SHOAL_* settings), then `env`, then
    `ctx.secret_env`; its output is redacted with `ctx.redactor` before it is emitted or kept
    for the result. With `users` that switch, it runs as the user leased for it (no other
    group, umask 077), in a directory of its own (its HOME, and its cwd unless `cwd` says
    otherwise) removed after.
    """
    if ctx.workdir is not None and not ctx.workdir.is_dir():
        # The node's set-up is wrong, not the task: another node may run it.
        return InfrastructureError(f"the node's workdir {ctx.workdir} is not a directory").outcome()
    if cwd:
        cwd = str(ctx.workdir / cwd) if ctx.workdir is not None else cwd
    if users is None or not users.switching:
        return await _run(argv, ctx, _environment(env, ctx), cwd or ctx.workdir, stdin, {})
    try:
        async with users.lease(ctx.workdir) as leased:
            assert leased is not None
            user, home = leased.user, leased.home
            merged = _environment(
                env, ctx, {"HOME": str(home), "USER": user.name, "LOGNAME": user.name}
            )
            if any(root_unsafe(name) for name in ctx.secret_env):
                # Set after the switch, its value would be on a command line for all to see.
                return TaskError(
                    "a secret cannot set LD_* or another variable the C library reads"
                ).outcome()
            try:
                command, merged = user.command(argv, merged, cwd)
            except ValueError as err:
                return TaskError(str(err), exit_code=127).outcome()
            # It starts in its own directory; what it writes is its own (umask 077).
            return await _run(command, ctx, merged, home, stdin, {"umask": 0o077}, leased.reap)
    except OSError as err:
        return InfrastructureError(
            f"cannot prepare the task's user and directory: {err.strerror or err}"
        ).outcome()


def tasks_environment() -> dict[str, str]:
    """The node's environment as tasks get it: the node's own settings (its token among them)
    and its API keys are not their business."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SHOAL_") and k not in NODE_ONLY_VARIABLES
    }


def _environment(
    env: Mapping[str, str] | None, ctx: ExecutionContext, user: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The node's environment without its own settings, then `user`'s, `env`, the secrets."""
    merged = tasks_environment()
    if user:
        merged.update(user)
    if env:
        merged.update(env)
    merged.update(ctx.secret_env)
    # `shoal progress` works in any task, though the node runs from a virtualenv not on PATH:
    # its scripts' directory comes last (nothing the task would find otherwise is shadowed).
    if _SCRIPTS and _SCRIPTS not in (path := merged.get("PATH", "")).split(os.pathsep):
        merged["PATH"] = f"{path}{os.pathsep}{_SCRIPTS}" if path else _SCRIPTS
    return merged


def _scripts_dir() -> str:
    """Where the node's own `shoal` command is (beside its interpreter), if it is there."""
    here = Path(sys.executable).parent
    return str(here) if (here / "shoal").is_file() else ""


_SCRIPTS = _scripts_dir()


async def _progress_lines(fd: int, ctx: ExecutionContext) -> None:
    """Read `<fraction> <message>` lines from the task's progress pipe until it closes; lines
    that are not that are skipped."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=_PROGRESS_LINE)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    try:
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError:
                return
            except asyncio.LimitOverrunError as err:
                await reader.readexactly(err.consumed)  # an overlong line: skipped
                continue
            head, _, message = line.decode(errors="replace").strip().partition(" ")
            try:
                fraction = float(head)
            except ValueError:
                continue
            ctx.progress(fraction, message)
    finally:
        transport.close()


async def _run(
    argv: Sequence[str],
    ctx: ExecutionContext,
    env: dict[str, str],
    cwd: str | Path | None,
    stdin: bytes,
    as_user: dict[str, Any],
    reap: Callable[[], Awaitable[None]] | None = None,
) -> Outcome:
    # The task reports progress as lines on this pipe (`shoal progress 0.5 "half"`).
    progress_read, progress_write = os.pipe()
    os.set_inheritable(progress_write, True)
    # A task run as another user reopens it by its path (/dev/fd/N): only processes that
    # hold it can name it there.
    os.fchmod(progress_write, 0o622)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            # The descriptor for programs; the path for shells, whose `>&N` takes one digit.
            env={
                **env,
                PROGRESS_FD: str(progress_write),
                PROGRESS_PATH: f"/dev/fd/{progress_write}",
            },
            cwd=cwd or None,
            start_new_session=True,
            pass_fds=(progress_write,),
            **as_user,
        )
    except (OSError, ValueError) as err:
        os.close(progress_read)
        os.close(progress_write)
        # The command could not start (not found, not executable, bad cwd, a NUL in it): the
        # task named it. A task that needs a program only some nodes have is placed there by
        # labels.
        why = err.strerror if isinstance(err, OSError) and err.strerror else err
        return TaskError(f"cannot start {argv[0]!r}: {why}", exit_code=127).outcome()
    os.close(progress_write)
    ctx.groups.add(proc.pid)
    out_tail, err_tail = _Tail(ctx.output_tail_bytes), _Tail(ctx.output_tail_bytes)
    assert proc.stdout is not None and proc.stderr is not None
    pumps = asyncio.gather(
        _feed(proc.stdin, stdin),
        _pump(proc.stdout, task_pb2.OUTPUT_STREAM_STDOUT, ctx, out_tail),
        _pump(proc.stderr, task_pb2.OUTPUT_STREAM_STDERR, ctx, err_tail),
        _progress_lines(progress_read, ctx),
    )
    try:
        # Not proc.wait(): it returns only once the pipes close too, which a process that
        # left the group (setsid) may hold open.
        await _exited(proc.pid)
        # Nothing the task started outlives it (and holds its pipes open).
        _kill_group(proc.pid)
        if reap is not None:
            await reap()
        await pumps
        await proc.wait()
    except BaseException:
        _kill_group(proc.pid)
        if reap is not None:
            await asyncio.shield(reap())
        pumps.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(proc.wait())
        with contextlib.suppress(asyncio.CancelledError):
            await pumps  # retrieve its CancelledError, or asyncio reports it as never retrieved
        raise
    finally:
        ctx.groups.discard(proc.pid)
    code = proc.returncode
    assert code is not None
    result = task_pb2.TaskResult(exit_code=code)
    set_result_text(result, "stdout", out_tail.text())
    set_result_text(result, "stderr", err_tail.text())
    if code < 0:
        result.error = f"killed by signal {signal.Signals(-code).name}"
    state = task_pb2.TASK_STATE_SUCCEEDED if code == 0 else task_pb2.TASK_STATE_FAILED
    return Outcome(state, result)
