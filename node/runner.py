"""The runner of a node's tasks: the coordinator's attempts and direct tasks, their slots,
secrets, redaction, timeouts and outcomes. No gRPC in here: the process (agent.py) serves,
holds the session and decides what the node takes; this runs what it took."""

from __future__ import annotations

import asyncio
import logging
import math
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from shoal._output import result_text, set_result_text
from shoal._progress import Sampler
from shoal.config import NodeSettings
from shoal.errors import AlreadyExists, InvalidArgument, ResourceExhausted
from shoal.node.deadline import PausableDeadline
from shoal.node.direct import DirectTask, DirectTasks
from shoal.node.executors.base import (
    ExecutionContext,
    Executor,
    Outcome,
    RunFailed,
    TaskError,
    unpaced,
)
from shoal.node.executors.groups import ProcessGroups
from shoal.node.ledger import Ledger
from shoal.node.output import OutputCap
from shoal.node.report import AttemptReport, Push, RunReport, Stop
from shoal.node.secrets import MissingSecrets, Redactor, SecretsNotGranted, SecretStore
from shoal.node.slots import Slots
from shoal.specs import executor_of
from shoal.v1 import node_pb2, task_pb2

__all__ = ["Runner"]

_log = logging.getLogger("shoal.node")
_NO_SECRETS = Redactor()  # what tasks without secrets are redacted with: nothing


def _stopped(state: int, error: str, output: OutputCap | None) -> Outcome:
    """The outcome of a task stopped before its executor made one (timed out, cancelled):
    with the end of what it wrote, which says where it was."""
    result = task_pb2.TaskResult(exit_code=-9, error=error)
    if output is not None:
        set_result_text(result, "stdout", output.end_of(task_pb2.OUTPUT_STREAM_STDOUT))
        set_result_text(result, "stderr", output.end_of(task_pb2.OUTPUT_STREAM_STDERR))
    return Outcome(state, result)


@dataclass(eq=False)
class _Run:
    task_id: str
    attempt: task_pb2.AttemptId  # none (zeros) for a direct task
    report: RunReport  # where its progress goes
    priority: int = task_pb2.PRIORITY_NORMAL
    slot: bool = False  # whether it holds one of the node's slots
    task: asyncio.Task[None] | None = None
    begun: bool = False  # whether its task has begun (a task cancelled before would not end)
    stop: str = ""  # a Stop reason, once stopped
    groups: ProcessGroups = field(default_factory=ProcessGroups)  # its processes, to pause
    deadline: PausableDeadline = field(default_factory=PausableDeadline)  # its timeout
    sampler: Sampler = field(default_factory=Sampler)  # of its progress reports

    def progress(self, fraction: float, message: str) -> None:
        """Pass on what the task says of its progress: clamped, and sampled (Sampler)."""
        if not math.isfinite(fraction):
            return
        fraction = min(1.0, max(0.0, fraction))
        if not self.sampler.passes(fraction, time.monotonic()):
            return
        self.report.progress(task_pb2.Progress(fraction=fraction, message=message[:200]))

    def pause(self) -> None:
        """Stop its processes (SIGSTOP; any it starts later, too) and its timeout's clock."""
        self.groups.pause()
        self.deadline.pause()

    def resume(self) -> None:
        """Let its processes run again (SIGCONT); its timeout goes on from where it stopped."""
        self.deadline.resume()
        self.groups.resume()


class Runner:
    """Runs the coordinator's attempts and direct tasks, each in a slot, and reports how each
    went: attempts into the ledger and `push` (the session's outbox), direct tasks to `direct`.

    It takes what it is given; whether the node takes work now (draining, a busy machine) is
    the process's call. `pausing()` says whether background tasks are to be paused now, and
    `on_groups_changed` is told when a task's processes start, end, stop or go on.
    """

    def __init__(
        self,
        settings: NodeSettings,
        node_id: str,
        executors: dict[str, Executor],
        *,
        secrets: SecretStore,
        push: Push,
        output_room: Callable[[], Awaitable[None]],
        pausing: Callable[[], bool],
        on_groups_changed: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.node_id = node_id
        self.executors = executors
        self.secrets = secrets
        self.slots = Slots(settings.slots)  # shared by both kinds of run
        self.direct = DirectTasks()  # what callers of the node's service see, kept a while
        self.idle = asyncio.Event()  # set while nothing runs
        self.idle.set()
        self._runs: dict[str, _Run] = {}  # the coordinator's attempts, by task id
        self._direct: dict[str, _Run] = {}  # tasks run for callers of the node's service
        self._ledger = Ledger(settings.ledger, node_id)
        self._push = push
        self._output_room = output_room
        self._pausing = pausing
        self._on_groups_changed = on_groups_changed

    @property
    def running(self) -> int:
        """The coordinator's attempts running now."""
        return len(self._runs)

    def running_attempts(self) -> list[node_pb2.RunningAttempt]:
        """The coordinator's attempts it still runs (not stopped)."""
        return [
            node_pb2.RunningAttempt(task_id=r.task_id, attempt=r.attempt)
            for r in self._runs.values()
            if not r.stop
        ]

    # -- the coordinator's attempts --------------------------------------------------------

    def assigned(self, a: node_pb2.Assignment) -> None:
        """Run an assigned attempt (a repeated assignment is ignored; a newer one replaces)."""
        run = self._runs.get(a.task_id)
        if run is not None:
            if run.attempt == a.attempt:
                return  # a repeated assignment
            self._stop(run, Stop.CANCEL)
        report = AttemptReport(a.task_id, a.attempt, self._ledger, self._push)
        self._launch(_Run(a.task_id, a.attempt, report), a.spec, self._runs)

    def give_back_unstarted(self, a: node_pb2.Assignment) -> None:
        """Give an assignment back without starting it: the node is draining."""
        self._ledger.write("release", a.task_id, a.attempt)
        self._push(
            node_pb2.TaskUpdate(
                task_id=a.task_id,
                attempt=a.attempt,
                released=node_pb2.Released(reason=Stop.RELEASE),
            )
        )

    def cancelled(self, c: node_pb2.RunningAttempt) -> None:
        """Stop that attempt, if it still runs."""
        run = self._runs.get(c.task_id)
        if run is not None and run.attempt == c.attempt and not run.stop:
            _log.info("node=%s task=%s cancelling", self.node_id, c.task_id)
            self._stop(run, Stop.CANCEL)

    def fence(self) -> None:
        """The lease ended: stop every attempt (the coordinator runs them elsewhere)."""
        runs = [r for r in self._runs.values() if r.task is not None and not r.stop]
        if runs:
            _log.warning(
                "node=%s could not renew its lease: stopping %d tasks", self.node_id, len(runs)
            )
            for run in runs:
                self._stop(run, Stop.FENCE)

    def give_back_all(self) -> None:
        """The drain's grace is over: give attempts back, and stop direct tasks."""
        runs = [r for r in self._runs.values() if r.task is not None and not r.stop]
        _log.warning("node=%s grace over: giving back %d tasks", self.node_id, len(runs))
        for run in runs:
            self._stop(run, Stop.RELEASE)
        for run in [r for r in self._direct.values() if not r.stop]:
            self._stop(run, Stop.DRAIN)

    # -- direct tasks: the node's own service ----------------------------------------------

    def execute(self, spec: task_pb2.TaskSpec, task_id: str = "") -> DirectTask:
        """Run a checked `spec` now in a free slot, for a caller of the node's service.

        Raises, changing nothing: ResourceExhausted (no free slot), AlreadyExists (`task_id`
        is taken).
        """
        if not self.slots.try_take():
            raise ResourceExhausted(
                f"node {self.node_id} has no free slot: all {self.slots.total} are taken"
            )
        try:
            task = self.direct.new(task_id)
        except AlreadyExists:
            self.slots.give()
            raise
        _log.info("node=%s task=%s runs directly (%s)", self.node_id, task.id, executor_of(spec))
        self._launch(_Run(task.id, task_pb2.AttemptId(), task, slot=True), spec, self._direct)
        return task

    def cancel_direct(self, task_id: str) -> DirectTask:
        """Stop a direct task (NotFound: no such task); its `ended` is set once it has ended."""
        task = self.direct.get(task_id)
        run = self._direct.get(task_id)
        if run is not None and not run.stop:
            _log.info("node=%s task=%s cancelling", self.node_id, task_id)
            self._stop(run, Stop.CANCEL)
        return task

    # -- pausing (the resource guard) ------------------------------------------------------

    def process_groups(self) -> list[int]:
        """The process groups of every task running now."""
        return [pgid for run in self._every_run() for pgid in run.groups]

    def paused(self) -> int:
        """How many tasks are paused now."""
        return sum(1 for run in self._every_run() if run.groups.stopped)

    def pause_background(self) -> None:
        """Pause every BACKGROUND task (SIGSTOP, and its timeout's clock)."""
        for run in self._every_run():
            if run.priority == task_pb2.PRIORITY_BACKGROUND:
                run.pause()

    def resume_all(self) -> None:
        """Let every paused task go on."""
        for run in self._every_run():
            run.resume()

    # -- ending ----------------------------------------------------------------------------

    async def async_stop(self) -> None:
        """Stop every task at once: direct ones say so to their callers; attempts end unreported
        (the coordinator runs them again)."""
        for run in self._direct.values():
            self._stop(run, Stop.SHUTDOWN)  # its caller hears how it ended
        for run in self._every_run():
            run.resume()  # never leave a task's processes stopped
        runs = [r.task for r in self._every_run() if r.task is not None]
        for task in runs:
            task.cancel()
        await asyncio.gather(*runs, return_exceptions=True)

    def close(self) -> None:
        """Close the ledger (after `async_stop`)."""
        self._ledger.close()

    # -- running ---------------------------------------------------------------------------

    def _launch(self, run: _Run, spec: task_pb2.TaskSpec, table: dict[str, _Run]) -> None:
        """Start a run, the coordinator's or a direct one, and keep it in `table` while it runs."""
        run.priority = spec.priority or task_pb2.PRIORITY_NORMAL
        run.groups = ProcessGroups(self._on_groups_changed)
        if self._pausing() and run.priority == task_pb2.PRIORITY_BACKGROUND:
            run.pause()  # sent before the coordinator heard that the machine is busy
        table[run.task_id] = run
        self.idle.clear()
        run.task = asyncio.create_task(self._run(run, spec), name=f"shoal-task-{run.task_id}")

    def _every_run(self) -> list[_Run]:
        """The coordinator's attempts and the direct tasks running now."""
        return [*self._runs.values(), *self._direct.values()]

    @staticmethod
    def _stop(run: _Run, why: str) -> None:
        run.stop = why
        run.resume()  # a paused task runs again before it is killed
        # One that has not begun (stopped in the turn it was started) sees `stop` as it
        # begins: cancelled now, its coroutine would end before its `finally` could report it
        # and give back its slot.
        if run.task is not None and run.begun:
            run.task.cancel()

    async def _run(self, run: _Run, spec: task_pb2.TaskSpec) -> None:
        run.begun = True
        try:
            if run.stop:  # stopped before it began: nothing ran
                outcome = Outcome(
                    task_pb2.TASK_STATE_CANCELLED, task_pb2.TaskResult(error=run.stop)
                )
            else:
                outcome = await self._execute(run, spec)
        except Exception as err:  # a bug: still report an outcome, or the slot stays taken
            _log.exception("node=%s task=%s failed to run", self.node_id, run.task_id)
            outcome = Outcome(
                task_pb2.TASK_STATE_FAILED,
                task_pb2.TaskResult(
                    error=f"node {self.node_id} failed to run it: {type(err).__name__}",
                    infrastructure_failure=True,
                ),
            )
        finally:
            self._forget(run)
        if run.stop in (Stop.RELEASE, Stop.FENCE):
            run.report.released(run.stop, outcome)
        else:
            run.report.finished(outcome)

    def _forget(self, run: _Run) -> None:
        """It ended: out of its table, and its slot given back."""
        for table in (self._runs, self._direct):
            if table.get(run.task_id) is run:
                del table[run.task_id]
        if run.slot:
            run.slot = False
            self.slots.give()
        if not self._runs and not self._direct:
            self.idle.set()

    async def _take_slot(self, run: _Run) -> None:
        if not self.slots.free:
            _log.info(
                "node=%s task=%s waits for a slot: %d direct tasks hold some",
                self.node_id,
                run.task_id,
                len(self._direct),
            )
        await self.slots.take()
        run.slot = True

    async def _execute(self, run: _Run, spec: task_pb2.TaskSpec) -> Outcome:
        name = executor_of(spec)
        executor = self.executors.get(name)
        if executor is None:
            return Outcome(
                task_pb2.TASK_STATE_FAILED,
                task_pb2.TaskResult(
                    error=f"executor {name!r} is not available on node {self.node_id}",
                    infrastructure_failure=True,
                ),
            )
        timeout = spec.timeout.ToNanoseconds() / 1e9 if spec.HasField("timeout") else None
        redactor = _NO_SECRETS
        output: OutputCap | None = None
        try:
            if not run.slot:
                await self._take_slot(run)
            try:
                secret_env = (
                    await asyncio.to_thread(self.secrets.resolve, spec.secrets, spec.tenant)
                    if spec.secrets
                    else {}
                )
            except SecretsNotGranted as err:
                # The task asked for what its tenant may not have: its own mistake.
                _log.warning("node=%s task=%s %s", self.node_id, run.task_id, err.message)
                return TaskError(err.message).outcome()
            except MissingSecrets as err:
                # The task's, not the node's: secrets are not advertised, so a task that needs
                # some must be placed (by labels) on nodes that hold them. Counting it against
                # the node would let any submitter open every node's breakers.
                _log.warning("node=%s task=%s %s", self.node_id, run.task_id, err.message)
                return TaskError(f"{err.message} (node {self.node_id})").outcome()
            except InvalidArgument as err:
                return TaskError(err.message).outcome()
            if secret_env:
                redactor = Redactor(secret_env.values())
            run.report.started()
            output = OutputCap(
                run.report.output,
                limit=self.settings.max_output_bytes,
                tail=self.settings.output_tail_bytes,
            )
            ctx = ExecutionContext(
                run.task_id,
                output,
                self.settings.output_tail_bytes,
                secret_env=secret_env,
                redactor=redactor,
                workdir=self.settings.workdir,
                groups=run.groups,
                paced=self._output_room if isinstance(run.report, AttemptReport) else unpaced,
                progress=run.progress,
            )
            try:
                if timeout is None:  # nothing to time: no timeout to pause either
                    outcome = await executor.run(spec, ctx)
                else:
                    async with run.deadline.running(timeout):
                        outcome = await executor.run(spec, ctx)
            finally:
                output.close()
        except TimeoutError:
            if timeout is None:  # not its deadline: an executor let one of its own escape
                raise
            outcome = _stopped(
                task_pb2.TASK_STATE_TIMED_OUT, f"timed out after {timeout:g} s", output
            )
        except asyncio.CancelledError:
            if not run.stop:
                raise
            outcome = _stopped(task_pb2.TASK_STATE_CANCELLED, run.stop, output)
        except RunFailed as err:
            outcome = err.outcome()  # redacted below, like any other
        except Exception as err:
            # Formatted here rather than by logging, so that it can be redacted.
            _log.error(
                "node=%s task=%s executor %s failed\n%s",
                self.node_id,
                run.task_id,
                name,
                redactor.redact("".join(traceback.format_exception(err))).rstrip(),
            )
            return Outcome(
                task_pb2.TASK_STATE_FAILED,
                task_pb2.TaskResult(
                    error=redactor.redact(f"executor {name} failed: {err}"),
                    infrastructure_failure=True,
                ),
            )
        if redactor:
            # Whatever the executor did, no value leaves the node in the result.
            result = outcome.result
            result.error = redactor.redact(result.error)
            for stream in ("stdout", "stderr"):
                set_result_text(result, stream, redactor.redact(result_text(result, stream)))
        return outcome
