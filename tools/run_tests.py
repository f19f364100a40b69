"""The course's whole test suite: what `make test` and CI run.

Steps, each in its own process (chapters cannot share one: each imports its own ``minisgl``):

- ``lint``: ``ruff check`` of our code (its settings, and the frozen snapshots it leaves out, are in
  pyproject.toml);
- ``chapter NN``: ``pytest chapters/NN``, the chapter's tests against its reference snapshot;
- ``repository``: ``pytest tests``, the top-level package and the repository's own checks;
- ``notebooks``: every chapter's notebook executed top to bottom;
- ``book``: ``tools/check_book.py``: ``mkdocs build --strict``, then the pages a learner reads opened
  in headless Chromium with the network blocked (diagrams drawn and readable, no raw markdown, code
  that fits); where Chromium is missing and cannot be installed, that part says SKIPPED;
- ``exercises``: every exercise's tests fail on its stub (``tools/check_exercises.py``);
- ``branches``: each chapter branch a learner can check out (``tools/chapters.py branches``) builds its
  own book with ``--strict`` and passes its own tests (``tools/check_branches.py``).

Every step runs even when an earlier one fails; the exit code is non-zero if any failed.

    python tools/run_tests.py                 # everything
    python tools/run_tests.py 01 book         # only these steps (chapter numbers or step names)
    python tools/run_tests.py lint            # only the lint; `ruff check --fix` repairs what it can
"""

import os
import subprocess
import sys
import time

from course import REPO_ROOT, chapters

PYTHON = sys.executable
ENV = os.environ | {"NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's notice about its successor, on every build


def steps() -> dict[str, list[str]]:
    pytest = [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    found = {"lint": [PYTHON, "-m", "ruff", "check", "minisgl", "tools", "benchmarks", "tests", "chapters"]}
    found |= {f"chapter {c}": pytest + [f"chapters/{c}"] for c in chapters()}
    found["repository"] = pytest + ["tests"]
    found["notebooks"] = [PYTHON, "tools/run_notebooks.py"]
    found["book"] = [PYTHON, "tools/check_book.py"]
    found["exercises"] = [PYTHON, "tools/check_exercises.py"]
    found["branches"] = [PYTHON, "tools/check_branches.py"]
    return found


def main() -> None:
    wanted = sys.argv[1:]
    selected = {name: cmd for name, cmd in steps().items() if not wanted or name in wanted or name[-2:] in wanted}
    if not selected:
        sys.exit(f"no such step: {' '.join(wanted)}; steps are: {', '.join(steps())}")
    results = {}
    for name, command in selected.items():
        print(f"\n===== {name}: {' '.join(command[1:])}", flush=True)
        started = time.perf_counter()
        returncode = subprocess.run(command, cwd=REPO_ROOT, env=ENV, check=False).returncode
        results[name] = (returncode == 0, time.perf_counter() - started)
    print("\n===== summary")
    for name, (ok, seconds) in results.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name:<12} {seconds:6.0f}s")
    failed = sum(not ok for ok, _ in results.values())
    print(f"steps: {len(results) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
