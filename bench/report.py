"""The benchmarks' report: every figure beside its target, and a plot of latency.

Reads the JSON files the benchmarks wrote (throughput, unary, roundtrip, memory, recovery, nodes,
scheduler; a missing one is listed as not run) and writes, next to them:

- report.md: one markdown table of every figure with its target and PASS/MISS, the runs'
  commits and times, and the errors the benchmarks recorded;
- latency.png: p50 and p99 submit-to-result latency (ms) against the throughput achieved
  (tasks/s) in throughput.json's latency phases (each point labelled with the rate offered),
  one colour per cluster size, with the latency targets and each size's max throughput.

    .venv/bin/python bench/report.py                 # make bench runs it after the benchmarks
    .venv/bin/python bench/report.py --results /tmp/results
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import RESULTS, TARGETS, Figure, figure
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as Plot
from throughput import throughput_figures

BENCHMARKS = (
    "throughput",
    "unary",
    "roundtrip",
    "memory",
    "recovery",
    "nodes",
    "scheduler",
    "floor",
)


def figures_of(name: str, data: dict[str, Any]) -> list[Figure]:
    """The figures of one benchmark's JSON file."""
    if name == "throughput":
        return throughput_figures(data.get("runs", []))
    if name == "scheduler":  # in-process, no target: the cost per task as the queue grows
        return [
            figure(
                f"schedule() per task, {r['queued']:,} queued",
                round(r["schedule_us_per_task"], 2),
                "µs",
            )
            for r in data.get("results", [])
        ]
    return [Figure(**f) for f in data.get("figures", [])]


def _value(f: Figure) -> str:
    return "-" if f.value is None else f"{f.value:,.6g} {f.unit}"


def write_markdown(loaded: dict[str, dict[str, Any]], plotted: bool, path: Path) -> Counter[str]:
    rows, runs, errors = [], [], []
    verdicts: Counter[str] = Counter()
    for name in BENCHMARKS:
        data = loaded.get(name)
        if data is None:
            rows.append(f"| {name} | not run (`bench/{name}.py`) | | | | |")
            verdicts["not run"] += 1
            continue
        info = data.get("meta", {})
        commit = (info.get("git_commit") or "?")[:10] + (
            " (dirty)" if info.get("git_dirty") else ""
        )
        speed = info.get("ns_per_loop_step")
        runs.append(
            f"- {name}: {info.get('time', '?')}, commit {commit}"
            + (f", machine speed {speed} ns per Python loop step" if speed else "")
        )
        if "error" in data:
            errors.append(f"- {name}: {data['error'].splitlines()[0]} (more in {name}.json)")
        for f in figures_of(name, data):
            verdicts[f.verdict or "no target"] += 1
            verdict = f"**{f.verdict}**" if f.verdict == "MISS" else f.verdict
            rows.append(f"| {name} | {f.name} | {_value(f)} | {f.target} | {verdict} | {f.note} |")
    summary = ", ".join(f"{n} {v}" for v, n in sorted(verdicts.items()))
    lines = [
        "# Shoal benchmarks",
        "",
        f"Targets of issue 9 ({summary}). Figures in MB are 10^6 bytes.",
        "",
        "| benchmark | figure | value | target | result | note |",
        "| --- | --- | ---: | --- | --- | --- |",
        *rows,
        "",
        *(["![latency against throughput](latency.png)", ""] if plotted else []),
        "## Runs",
        "",
        *runs,
    ]
    if errors:
        lines += ["", "## Errors", "", *errors]
    path.write_text("\n".join(lines) + "\n")
    return verdicts


def write_plot(throughput: dict[str, Any] | None, path: Path) -> bool:
    """latency.png from the latency phases; False when there is nothing to plot."""
    plot = Plot(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(plot)
    ax = plot.subplots()
    drawn = False
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for i, run in enumerate((throughput or {}).get("runs", [])):
        colour = colours[i % len(colours)]
        rows = [
            r for r in run["phases"] if r["mode"] != "throughput" and r["tasks_per_s"] is not None
        ]
        rows.sort(key=lambda r: r["tasks_per_s"])
        label = f"{run['nodes']} node(s)"
        if rows:
            x = [r["tasks_per_s"] for r in rows]
            ax.plot(x, [r["p50_ms"] for r in rows], "o-", color=colour, label=f"p50, {label}")
            ax.plot(x, [r["p99_ms"] for r in rows], "s--", color=colour, label=f"p99, {label}")
            for r in rows:
                ax.annotate(
                    f"offered {r['offered_per_s']:,.0f}/s",
                    (r["tasks_per_s"], r["p99_ms"]),
                    textcoords="offset points",
                    xytext=(4, 6),
                    fontsize=7,
                    color=colour,
                )
            drawn = True
        top = next((r["tasks_per_s"] for r in run["phases"] if r["mode"] == "throughput"), None)
        if top:
            ax.axvline(top, color=colour, linestyle=":", linewidth=1, label=f"max, {label}")
    if not drawn:
        return False
    for key in ("p50", "p99"):
        limit = TARGETS[key].limit
        ax.axhline(limit, color="grey", linestyle="-.", linewidth=1)
        ax.annotate(
            f"{key} target {limit:g} ms",
            (0, limit),
            xycoords=("axes fraction", "data"),
            xytext=(4, 2),
            textcoords="offset points",
            fontsize=7,
            color="grey",
        )
    ax.set_yscale("log")
    ax.set_xlabel("throughput achieved (tasks/s)")
    ax.set_ylabel("submit-to-result latency (ms)")
    commit = throughput.get("meta", {}).get("git_commit", "")[:10] if throughput else ""
    ax.set_title(f"No-op tasks end to end, SubmitBatch, synchronous=FULL ({commit})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    plot.tight_layout()
    plot.savefig(path)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write report.md and latency.png from the results.")
    p.add_argument("--results", type=Path, default=RESULTS, help="where the JSON files are")
    p.add_argument("--out", type=Path, default=None, help="where to write (default: --results)")
    args = p.parse_args(argv)
    out = args.out or args.results
    out.mkdir(parents=True, exist_ok=True)
    loaded: dict[str, dict[str, Any]] = {}
    for name in BENCHMARKS:
        path = args.results / f"{name}.json"
        try:
            loaded[name] = json.loads(path.read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as err:
            print(f"cannot read {path}: {err}", file=sys.stderr)
    plotted = write_plot(loaded.get("throughput"), out / "latency.png")
    if not plotted:
        (out / "latency.png").unlink(missing_ok=True)  # not one of an older run
    verdicts = write_markdown(loaded, plotted, out / "report.md")
    print(f"written: {out / 'report.md'}" + (f", {out / 'latency.png'}" if plotted else ""))
    print(", ".join(f"{n} {v}" for v, n in sorted(verdicts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
