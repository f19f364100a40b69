"""The course's whole test suite: what `make test` and CI run.

Steps, each in its own process (chapters cannot share one: each imports its own ``minisgl``):

- ``lint``: ``ruff check`` of our code (its settings, and the frozen snapshots it leaves out, are in
  pyproject.toml);
- ``chapter NN``: ``pytest chapters/NN``, the chapter's tests against its reference snapshot;
- ``repository``: ``pytest tests``, the top-level package and the repository's own checks;
- ``notebooks``: every chapter's notebook executed top to bottom;
- ``book``: ``tools/check_book.py``: the pages a learner reads opened in headless Chromium with the
  network blocked (diagrams drawn and readable, no raw markdown, code that fits); where Chromium is
  missing and cannot be installed, that part says SKIPPED;
- ``exercises``: every exercise's tests fail on its stub (``tools/check_exercises.py``);
- ``branches``: each chapter branch a learner can check out (``tools/chapters.py branches``) builds its
  own book with ``--strict`` and passes its repository checks; with ``--full-branches`` (CI) each also
  runs its chapter's tests again (``tools/check_branches.py`` says why that is left to CI).

The book is built once, with ``mkdocs build --strict``, before the steps start; ``repository`` and
``book`` both read that build (``MINISGL_BUILT_SITE``) instead of building their own.

Steps run two at a time (``--jobs``): much of a step is one Python thread at a time (imports, servers
starting, ranks meeting, clients reading streams), which a second step overlaps. That pays only when
idle OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``, set below for every step):
on the course's 2-core machine the steps took 26 minutes with spinning threads and 16 with sleeping
ones. Each step's output is printed whole when it ends, so two steps never
interleave; the longest steps start first.

Every step runs even when an earlier one fails; the exit code is non-zero if any failed.

    python tools/run_tests.py                 # everything
    python tools/run_tests.py 01 book         # only these steps (chapter numbers or step names)
    python tools/run_tests.py --jobs 1        # one step at a time, its output as it comes
    python tools/run_tests.py lint            # only the lint; `ruff check --fix` repairs what it can
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from course import REPO_ROOT, chapters

PYTHON = sys.executable
ENV = os.environ | {"NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's notice about its successor, on every build
# torch's OpenMP threads spin for a while after each parallel region, waiting for the next one. With two
# steps at once, each with its servers' threads, the spinning threads of one step take the cores the other
# needs: chapters 01 and 02 together took 125 s (46 s and 51 s alone). Threads that sleep when idle
# ("PASSIVE") took 49 s for both. A choice of the caller (OMP_WAIT_POLICY already set) is kept. Only the
# tests run this way: waking a sleeping thread costs a latency-bound run dearly (one stream decoding alone,
# benchmarks/single_stream.py: 37.6 tok/s by default, 29.1 passive), so the benchmarks and servers leave it.
ENV.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The steps that take longest on the course's 2-core machine, longest first: they start first, so that
# the short ones fill the other lane at the end instead of one long step running alone.
LONGEST_FIRST = ["branches", "chapter 06", "chapter 04", "chapter 05", "exercises", "notebooks", "chapter 03"]


def steps(full_branches: bool = False) -> dict[str, list[str]]:
    pytest = [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    found = {"lint": [PYTHON, "-m", "ruff", "check", "minisgl", "tools", "benchmarks", "tests", "chapters"]}
    found |= {f"chapter {c}": pytest + [f"chapters/{c}"] for c in chapters()}
    found["repository"] = pytest + ["tests"]
    found["notebooks"] = [PYTHON, "tools/run_notebooks.py"]
    found["book"] = [PYTHON, "tools/check_book.py"]
    found["exercises"] = [PYTHON, "tools/check_exercises.py"]
    found["branches"] = [PYTHON, "tools/check_branches.py"] + (["--full"] if full_branches else [])
    return found


def run_step(name: str, command: list[str], env: dict, capture: bool) -> tuple[bool, float, str]:
    """Run one step; returns whether it passed, its seconds, and its output (empty when not captured)."""
    started = time.perf_counter()
    if not capture:
        print(f"\n===== {name}: {' '.join(command[1:])}", flush=True)
        returncode = subprocess.run(command, cwd=REPO_ROOT, env=env, check=False).returncode
        return returncode == 0, time.perf_counter() - started, ""
    sys.stdout.write(f"----- started {name}\n")  # one write: print's line and its newline are two, and interleave
    sys.stdout.flush()
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, check=False)
    seconds = time.perf_counter() - started
    header = f"\n===== {name}: {' '.join(command[1:])} ({seconds:.0f}s)\n"
    return done.returncode == 0, seconds, header + done.stdout


def build_site(site: Path) -> bool:
    command = [PYTHON, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(site)]
    print("===== the book: mkdocs build --strict", flush=True)
    return subprocess.run(command, cwd=REPO_ROOT, env=ENV, check=False).returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("steps", nargs="*", help="chapter numbers or step names (default: every step)")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MINISGL_TEST_JOBS", "2")),
                        help="steps run at once (default 2, or MINISGL_TEST_JOBS)")
    parser.add_argument("--full-branches", action="store_true",
                        default=os.environ.get("MINISGL_FULL_BRANCHES", "") not in ("", "0"),
                        help="the branches step runs each branch's chapter tests too (CI sets MINISGL_FULL_BRANCHES)")
    args = parser.parse_args()
    every = steps(args.full_branches)
    selected = {name: cmd for name, cmd in every.items()
                if not args.steps or name in args.steps or name[-2:] in args.steps}
    if not selected:
        sys.exit(f"no such step: {' '.join(args.steps)}; steps are: {', '.join(every)}")
    order = sorted(selected, key=lambda n: LONGEST_FIRST.index(n) if n in LONGEST_FIRST else len(LONGEST_FIRST))
    started = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="minisgl-test-site-") as temp:
        env = ENV
        if {"repository", "book"} & set(selected):
            site = Path(temp) / "site"
            if build_site(site):
                env = ENV | {"MINISGL_BUILT_SITE": str(site)}
            else:
                results["book build"] = (False, time.perf_counter() - started)
        jobs = max(1, min(args.jobs, len(order)))
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {name: pool.submit(run_step, name, selected[name], env, jobs > 1) for name in order}
            for name in order:  # in the order they started; each printed whole as soon as it and those before end
                ok, seconds, output = futures[name].result()
                print(output, end="", flush=True)
                results[name] = (ok, seconds)
    print("\n===== summary")
    for name, (ok, seconds) in results.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name:<12} {seconds:6.0f}s")
    failed = sum(not ok for ok, _ in results.values())
    print(f"steps: {len(results) - failed} passed, {failed} failed; {time.perf_counter() - started:.0f}s "
          f"in all, {args.jobs} at a time")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
