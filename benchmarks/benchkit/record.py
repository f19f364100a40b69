"""What every benchmark result says and how it is written: the machine and the run, the table, the files.

A result is written twice: ``benchmarks/results/NAME.md`` for people to read, and ``NAME.json`` beside it
for programs (the table's rows, the same rounded numbers, and how they were measured), from which
``plot_results.py`` draws the book's plot and fragment. The helpers here keep the opening lines and the
tables of every result alike. Nothing here imports torch or matplotlib: the TP ranks import it too.
"""

import datetime
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS = REPO_ROOT / "benchmarks" / "results"
# What a serving benchmark's result names with its version, after python.
SERVING_PACKAGES = ("torch", "transformers", "fastapi", "uvicorn", "httpx")


# ---------------------------------------------------------------- where and what ran


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def git_commit(*paths: str) -> str:
    """The commit measured, marked if ``paths`` (the code the benchmark runs) have uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(  # no answer: no note of uncommitted changes
            ["git", "status", "--porcelain", *paths], cwd=REPO_ROOT, capture_output=True, text=True, check=False
        )
        return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command_line(script: str) -> str:
    """This run's command as typed from the repository root, so that a result says how to make it again."""
    return " ".join([f"python benchmarks/{script}.py", *map(shlex.quote, sys.argv[1:])])


def warn_if_busy(load: float, threshold: float = 1.0) -> None:
    """Other work on the machine skews every number: with 2 cores, one busy neighbour can make a 2-thread
    decode several times slower."""
    if load > threshold:
        print(f"warning: load average is {load:.2f} on {os.cpu_count()} cores; results will be noisy", file=sys.stderr)


@dataclass
class Start:
    """How a run began: the load averages then, the clock, and the commit it measures."""

    load: tuple[float, float, float]
    clock: float
    commit: str


def start_run(*paths: str, busy_threshold: float = 1.0) -> Start:
    """Note the load and the commit of ``paths`` (the code the benchmark runs) before anything is measured: others
    commit while a run goes on, and the commit at the start is the code the run loads."""
    start = Start(os.getloadavg(), time.perf_counter(), git_commit(*paths))
    warn_if_busy(start.load[0], busy_threshold)
    return start


def run_info(benchmark: str, title: str, start: Start, model_path: Path,
             packages: tuple[str, ...] = SERVING_PACKAGES) -> dict:
    """The fields every result's JSON opens with: what ran, when, where, how loaded, with which versions."""
    return {
        "benchmark": benchmark,
        "title": title,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "elapsed_min": round((time.perf_counter() - start.clock) / 60, 1),
        "machine": cpu_model(),
        "cores": os.cpu_count(),
        "load_before": [round(x, 2) for x in start.load],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "versions": {"python": platform.python_version(), **{name: version(name) for name in packages}},
        "commit": start.commit,
        "command": command_line(benchmark),
        "model": model_path.name,
    }


# ---------------------------------------------------------------- the markdown result's opening lines


def load_line(before, after) -> str:
    """The 1, 5 and 15 minute load averages before and after the run: how busy the machine was."""
    return (
        f"- load average (1, 5, 15 min) before: {' / '.join(f'{x:.2f}' for x in before)}; "
        f"after: {' / '.join(f'{x:.2f}' for x in after)}"
    )


def versions_text(versions: dict) -> str:
    return ", ".join(f"{name} {v}" for name, v in versions.items())


def opening_lines(run: dict, machine_note: str = "") -> list[str]:
    """The title, then when, on what and under which load, from ``run_info``'s fields."""
    return [
        f"# {run['title']}",
        "",
        f"- date: {run['date']}; whole run {run['elapsed_min']:.1f} min",
        f"- machine: {run['machine']}, {run['cores']} cores{machine_note}",
        load_line(run["load_before"], run["load_after"]),
    ]


def run_lines(run: dict, details: list[str] = ()) -> list[str]:
    """A server benchmark's opening lines: ``opening_lines``, the versions and the commit the servers loaded
    (the one at the start: others commit while a run goes on), the model, ``details``, the command."""
    return [
        *opening_lines(run, "; server and client share them"),
        f"- {versions_text(run['versions'])}; minisgl commit {run['commit']} (at the start)",
        f"- model: {run['model']}",
        *details,
        f"- command: `{run['command']}`",
    ]


# ---------------------------------------------------------------- tables


def column_key(header: str) -> str:
    """A table column's key in the JSON: "TTFT p50 s" -> "ttft_p50_s", "tok / CPU s" -> "tok_cpu_s"."""
    return re.sub(r"[^a-z0-9]+", "_", header.lower()).strip("_")


def rounded(value, digits: int | None):
    """A number as the table prints it, so that the JSON holds exactly the table's numbers."""
    if digits is None or value is None:
        return value
    if math.isnan(value):
        return None  # nothing measured (JSON has no NaN); the table prints n/a
    return round(value) if digits == 0 else round(value, digits)


def cell(value, digits: int | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if digits else str(value)


def table_row(columns: dict, values: list) -> dict:
    """``columns``: header -> decimals (None: as it is); one row keyed by ``column_key(header)``, rounded."""
    return {column_key(header): rounded(v, digits) for (header, digits), v in zip(columns.items(), values)}


def markdown_table(header: list[str], rows: list[list], align: str) -> list[str]:
    """A markdown table; ``align`` has an ``l`` (words) or ``r`` (numbers) per column."""
    rule = "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"
    return ["| " + " | ".join(header) + " |", rule] + ["| " + " | ".join(map(str, row)) + " |" for row in rows]


def columns_table(columns: dict, rows: list[dict], left: int = 1) -> list[str]:
    """The table of rows made by ``table_row``; the first ``left`` columns are words, the others numbers."""
    cells = [[cell(row[column_key(h)], digits) for h, digits in columns.items()] for row in rows]
    return markdown_table(list(columns), cells, "l" * left + "r" * (len(columns) - left))


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens agree: equal greedy tokens mean both engines did the same work."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# ---------------------------------------------------------------- the files


def dumps(result: dict) -> str:
    return json.dumps(result, indent=2) + "\n"


def write_result(output: Path, text: str, result: dict | None = None) -> None:
    """``NAME.md``, printed; with a ``result``, ``NAME.json`` beside it and then the chapter plot and fragment,
    if a chapter page shows this result."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    written = [output]
    if result is not None:
        written.append(output.with_suffix(".json"))
        written[-1].write_text(dumps(result))
    print("\n" + text)
    print(f"written to {' and '.join(map(str, written))}")
    if result is not None:
        # Here, not above: drawing imports matplotlib, and plot_results imports this module.
        from plot_results import render

        render(written[-1])
