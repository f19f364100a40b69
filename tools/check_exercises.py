"""Prove that every exercise is real: its tests fail on the stub and pass on the reference.

For each chapter and each exercise in it, this makes a workspace where only that exercise is stubbed
and runs ``pytest chapters/NN --learn=<workspace> -k <exercise>`` (collecting only the chapter's test files
that mention the exercise, the only ones ``-k`` can select from). It fails when an exercise selects
no test, or when a selected test passes on the stub (a test that cannot notice a missing body, or a
test that ``-k`` picked up by accident because its name contains the exercise's). That the same tests
pass on the reference is checked by the chapter's own test run.

The same run checks the exercise's focused test (``@pytest.mark.exercise(NAME, focused=True)``): exactly
one selected test is focused on it, and it is the first to fail, so that ``-k NAME -x`` stops there.
The junit report lists the tests in the order they ran (``-x`` changes where a run stops, not its
order) and names each focused test's exercise in a ``focused_exercise`` property (the root conftest.py
adds it).

    python tools/check_exercises.py [01 02 ...]
"""

import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from course import CHAPTERS_DIR, REPO_ROOT, chapter_exercises, chapters, exercises, snapshot_root, tested_exercises
from learn import make_workspace


def files_that_may_match(chapter: str, name: str) -> list[str]:
    """The chapter's test files that ``-k name`` can select from: those whose text (or file name) holds the
    name, any case. A test is selected by its exercise mark, which names it, or by a name or id that
    contains it, which the file's text shows too. Collecting only these, not the whole chapter, spares each
    run the other modules' imports."""
    tests = CHAPTERS_DIR / chapter / "tests"
    found = [p for p in sorted(tests.rglob("test_*.py")) if name.lower() in p.read_text(encoding="utf-8").lower()]
    return [p.relative_to(REPO_ROOT).as_posix() for p in found] or [f"chapters/{chapter}"]


def run_selected(chapter: str, name: str, learn: Path, report: Path) -> list[tuple[str, bool, set[str]]]:
    """Run chapter's tests selected by ``-k name`` against workspace ``learn``; returns, in the order they ran,
    each test's id, whether it passed, and the exercises it is the focused test of."""
    command = [sys.executable, "-m", "pytest", *files_that_may_match(chapter, name), "-q", "-p", "no:cacheprovider",
               "-k", name]
    command += ["-p", "no:randomly", f"--junitxml={report}", f"--learn={learn}"]
    # Failing tests are expected (stubs fail); the results come from the junit report, not the exit code.
    subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    results = []
    for case in ET.parse(report).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        passed = not any(child.tag in ("failure", "error") for child in case)
        focused = {p.get("value") for p in case.iter("property") if p.get("name") == "focused_exercise"}
        results.append((test_id, passed, focused))
    return results


def verdict(name: str, on_stub: list[tuple[str, bool, set[str]]]) -> str:
    """What is wrong with an exercise's tests, run on its stub (in the order they ran), or "ok"."""
    if not on_stub:
        return "selects no test"
    passing_on_stub = [test_id for test_id, passed, _ in on_stub if passed]
    if passing_on_stub:
        return f"passes on the stub: {', '.join(passing_on_stub)}"
    # A parametrized focused test is still one test: its cases share a function, hence an id up to "[".
    focused = list(dict.fromkeys(test_id.split("[")[0] for test_id, _, names in on_stub if name in names))
    if len(focused) != 1:
        return f"has {len(focused)} focused tests, expected exactly one{': ' if focused else ''}{', '.join(focused)}"
    first_failing = next(test_id for test_id, passed, _ in on_stub if not passed)
    if first_failing.split("[")[0] != focused[0]:
        return f"-x stops at {first_failing}, not at its focused test {focused[0]}"
    return "ok"


def check(chapter: str) -> list[str]:
    problems = []
    for name in sorted(tested_exercises(chapter) - set(exercises(snapshot_root(chapter) / "minisgl"))):
        problems.append(f"chapter {chapter}: tests mark exercise {name!r}, which has no region in the code")
    for name in sorted(chapter_exercises(chapter)):
        with tempfile.TemporaryDirectory() as tmp:
            workspace = Path(tmp) / "workspace"
            make_workspace(chapter, workspace, only={name})
            on_stub = run_selected(chapter, name, workspace, Path(tmp) / "stub.xml")
        found = verdict(name, on_stub)
        focused = next((test_id.rpartition("::")[2] for test_id, _, names in on_stub if name in names), None)
        print(f"chapter {chapter} exercise {name}: {len(on_stub)} test(s), focused {focused}, {found}", flush=True)
        if found != "ok":
            problems.append(f"chapter {chapter} exercise {name}: {found}")
    return problems


def main() -> None:
    selected = sys.argv[1:] or chapters()
    problems = [p for chapter in selected for p in check(chapter)]
    if problems:
        sys.exit("\n".join(["exercise check failed:", *problems]))
    print("every exercise's tests fail on its stub, its focused test first")


if __name__ == "__main__":
    main()
