"""Time per MB of the submit-time checks on template-heavy specs, and of filling references.

What is measured: `validate_batch` of one spec of about 1 MB (the spec size limit), in
process, for hostile strings full of `${{` (unterminated, nested, malformed, in code and in
env values), and `render` of a spec whose env value holds the most references a spec may.
Each figure is the median of a few runs, in ms per MB of spec (for render, of the filled
spec): a check that is linear stays flat across cases, and the event loop is held that long
by one such Submit.

    .venv/bin/python bench/templates.py
    .venv/bin/python bench/templates.py --runs 9
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from _common import MB

from shoal import python, shell
from shoal.errors import InvalidArgument
from shoal.templates import render
from shoal.v1 import task_pb2
from shoal.validation import Limits, validate_batch

SIZE = 1_000_000
REF = "${{ deps[0].stdout }}"


def _hostile() -> dict[str, task_pb2.TaskSpec]:
    n = SIZE // 8
    return {
        "plain text, no ${{": shell(["echo", "x" * SIZE]),
        "${{ repeated, unterminated": shell("${{" * (SIZE // 3)),
        "${{ deps[ repeated": shell(["echo", "${{ deps[" * (SIZE // 9)]),
        "${{}} repeated (malformed)": python("", env={"X": "${{}}" * (SIZE // 5)}),
        "nested ${{ ... }}": shell(["echo", "${{ " * n + REF + " }}" * n]),
        "one span of 1 MB": shell(["echo", "${{" * (SIZE // 3 - 1) + "}}"]),
        "long output path": shell(["echo", "${{ deps[0].output." + "a" * SIZE + " }}"]),
        "program named by 1M digits": shell(["1" * SIZE + "x", REF]),
        "index of 1M digits": shell(["echo", "${{ deps[" + "9" * SIZE + "].stdout }}"]),
        "references in code": python("#" + REF * (SIZE // len(REF))),
        "argv of many references": shell(["echo", *[REF] * (SIZE // (len(REF) + 2))]),
        "argv of 300k strings, one ${{": shell(["echo", *[""] * 300_000, REF]),
        "Struct of 50k strings, one ${{": _custom({f"k{i}": "v" for i in range(50_000)}),
    }


def _custom(params: dict[str, str]) -> task_pb2.TaskSpec:
    spec = task_pb2.TaskSpec(custom=task_pb2.CustomSpec(executor="mine"))
    spec.custom.params.update({**params, "last": REF})
    return spec


def _median_seconds(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _check(spec: task_pb2.TaskSpec) -> str:
    try:
        validate_batch([spec], Limits(), single=True)
    except InvalidArgument as err:
        return f"refused ({len(err.violations)} violations)"
    return "accepted"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(f"{'submit check':34} {'MB':>6} {'ms/MB':>8}  outcome")
    for name, spec in _hostile().items():
        spec.depends_on.add(task_id="upstream")
        size = spec.ByteSize() / MB
        seconds = _median_seconds(lambda spec=spec: _check(spec), args.runs)  # type: ignore[misc]
        print(f"{name:34} {size:6.2f} {seconds * 1e3 / size:8.2f}  {_check(spec)}")

    # The most references a spec may hold, each filled with a 60 kB stdout tail: ~4 MB out.
    limits = Limits()
    n = limits.max_labels
    spec = python("pass", env={"X": ("y" * (SIZE // n - len(REF)) + REF) * n})
    spec.depends_on.add(task_id="upstream")
    validate_batch([spec], limits, single=True)
    upstream = [task_pb2.TaskResult(stdout="z" * 60_000)]
    out = render(spec, upstream, limit=limits.max_rendered_spec_bytes).ByteSize() / MB
    seconds = _median_seconds(
        lambda: render(spec, upstream, limit=limits.max_rendered_spec_bytes), args.runs
    )
    print(f"{f'render, {n} references':34} {out:6.2f} {seconds * 1e3 / out:8.2f}  filled")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
