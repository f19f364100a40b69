"""Prove that every exercise is real: its tests fail on the stub and pass on the reference.

For each chapter and each exercise in it, this makes a workspace where only that exercise is stubbed
and runs ``pytest chapters/NN --learn=<workspace> -k <exercise>``. It fails when an exercise selects
no test, or when a selected test passes on the stub (a test that cannot notice a missing body, or a
test that ``-k`` picked up by accident because its name contains the exercise's). That the same tests
pass on the reference is checked by the chapter's own test run.

    python tools/check_exercises.py [01 02 ...]
"""

import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from course import REPO_ROOT, chapter_exercises, chapters, exercises, snapshot_root, tested_exercises
from learn import make_workspace


def run_selected(chapter: str, name: str, learn: Path, report: Path) -> dict[str, bool]:
    """Run chapter's tests selected by ``-k name`` against workspace ``learn``; returns test id -> passed."""
    command = [sys.executable, "-m", "pytest", f"chapters/{chapter}", "-q", "-p", "no:cacheprovider", "-k", name]
    command += [f"--junitxml={report}", f"--learn={learn}"]
    # Failing tests are expected (stubs fail); the results come from the junit report, not the exit code.
    subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    results = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        results[test_id] = not any(child.tag in ("failure", "error") for child in case)
    return results


def check(chapter: str) -> list[str]:
    problems = []
    for name in sorted(tested_exercises(chapter) - set(exercises(snapshot_root(chapter) / "minisgl"))):
        problems.append(f"chapter {chapter}: tests mark exercise {name!r}, which has no region in the code")
    for name in sorted(chapter_exercises(chapter)):
        with tempfile.TemporaryDirectory() as tmp:
            workspace = Path(tmp) / "workspace"
            make_workspace(chapter, workspace, only={name})
            on_stub = run_selected(chapter, name, workspace, Path(tmp) / "stub.xml")
        passing_on_stub = [t for t, ok in on_stub.items() if ok]
        verdict = "ok"
        if not on_stub:
            verdict = "selects no test"
        elif passing_on_stub:
            verdict = f"passes on the stub: {', '.join(passing_on_stub)}"
        print(f"chapter {chapter} exercise {name}: {len(on_stub)} test(s), {verdict}", flush=True)
        if verdict != "ok":
            problems.append(f"chapter {chapter} exercise {name}: {verdict}")
    return problems


def main() -> None:
    selected = sys.argv[1:] or chapters()
    problems = [p for chapter in selected for p in check(chapter)]
    if problems:
        sys.exit("\n".join(["exercise check failed:", *problems]))
    print("every exercise's tests fail on its stub")


if __name__ == "__main__":
    main()
