"""`wordcount` (a `custom` task): counts the words of `params.text`, line by line.

Params: `text` (a string), and `pace` (seconds to wait after each line, default 0, so that its
progress can be watched). Options (`[node.executor_options.wordcount]`): `top`, how many of the
most frequent words the output lists (default 10).
"""

from __future__ import annotations

import asyncio
import collections
import math

from shoal.node.executors.base import ExecutionContext, Executor, Outcome
from shoal.v1 import task_pb2

__all__ = ["WordcountExecutor"]

_MAX_PACE = 60.0  # seconds; a typo must not park a slot for hours


class WordcountExecutor(Executor):
    """Registered by its entry point: nodes that have this package installed offer it."""

    name = "wordcount"

    async def run(self, spec: task_pb2.TaskSpec, ctx: ExecutionContext) -> Outcome:
        params = spec.custom.params.fields
        text = params.get("text")
        if text is None or text.WhichOneof("kind") != "string_value":
            # The task's own mistake: a task failure, not an infrastructure one.
            return Outcome(
                task_pb2.TASK_STATE_FAILED,
                task_pb2.TaskResult(error="params.text must be a string: the text to count"),
            )
        pace = params["pace"].number_value if "pace" in params else 0.0
        pace = min(pace, _MAX_PACE) if math.isfinite(pace) and pace > 0 else 0.0
        lines = text.string_value.splitlines()
        counts: collections.Counter[str] = collections.Counter()
        for number, line in enumerate(lines, 1):
            words = line.split()
            counts.update(word.lower().strip(".,;:!?\"'()") for word in words)
            ctx.emit(
                task_pb2.OutputChunk(
                    stream=task_pb2.OUTPUT_STREAM_PROGRESS,
                    data=f"line {number}/{len(lines)}: {len(words)} words\n",
                )
            )
            # Cancellation (and the node's timeout) arrives here; there is nothing to clean up.
            await asyncio.sleep(pace)
        total = sum(counts.values())
        summary = f"{total} words in {len(lines)} lines\n"
        ctx.emit(task_pb2.OutputChunk(stream=task_pb2.OUTPUT_STREAM_STDOUT, data=summary))
        result = task_pb2.TaskResult(exit_code=0, stdout=summary)
        top = int(self.options.get("top", 10))
        result.output.update(
            {"words": total, "lines": len(lines), "top": dict(counts.most_common(top))}
        )
        return Outcome(task_pb2.TASK_STATE_SUCCEEDED, result)
