"""Check the chapter branches as a learner gets them (introduced in chapter 03).

``python tools/chapters.py branches`` makes a branch ``chapter-NN`` per chapter: the repository as of
the end of that chapter, its snapshot as the top-level ``minisgl/`` and the later chapters gone. A
learner who checks one out expects what main gives: a book that builds and tests that pass. This
script makes the branches in a throwaway clone (from committed files only, like the command itself)
and, for each chapter but the newest (whose branch has main's tree), in a worktree of that branch:

- builds the branch's book with ``mkdocs build --strict``, once: the branch's own book tests read that
  build (``MINISGL_BUILT_SITE``);
- runs the branch's repository checks, ``pytest tests``: its layout, its book, its chapter tooling;
- collects the chapter's tests, ``pytest chapters/NN --collect-only``, and runs its import checks
  (``test_imports.py``, ``test_snapshot.py``): they import the top-level package, which on the branch is
  the snapshot, and say so if a module is missing there.

With ``--full`` (CI sets it through ``tools/run_tests.py --full-branches``), it runs the chapter's whole
suite on the branch instead, ``pytest tests chapters/NN``. ``make test`` leaves that to CI: the branch's
``minisgl/`` is the snapshot's own tree, stored once in git (``git read-tree --prefix``), and its tests
are the snapshot's, so the whole suite runs the same code on the same tests as the ``chapter NN`` step
already did on main; what moves is only where the package is imported from, which the import checks
cover. It is ten minutes of a learner's test run for a check that can fail only if the branch-making
itself breaks.

    python tools/check_branches.py          # every branch; the "branches" step of `make test`
    python tools/check_branches.py 01       # only chapter-01
    python tools/check_branches.py --full   # each branch's whole chapter suite too (CI)
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from chapters import git
from course import REPO_ROOT

PYTHON = sys.executable
# A commit needs a name; the clone may run where git has none configured (a CI machine).
IDENTITY = {"GIT_AUTHOR_NAME": "minisgl", "GIT_AUTHOR_EMAIL": "minisgl@localhost",
            "GIT_COMMITTER_NAME": "minisgl", "GIT_COMMITTER_EMAIL": "minisgl@localhost"}
# Files the book needs that setup fetches rather than git stores (tools/fetch_assets.py).
FETCHED = ["docs/assets/javascripts/mermaid.min.js"]
# A chapter's tests that check which package they import and what it imports, where the chapter has them.
IMPORT_CHECKS = ["test_snapshot.py", "test_imports.py"]


def run(command: list[str], cwd: Path, env: dict | None = None) -> bool:
    print(f"$ {' '.join(command)}", flush=True)
    return subprocess.run(command, cwd=cwd, env=env, check=False).returncode == 0


def check_branch(clone: Path, chapter: str, work: Path, full: bool) -> list[str]:
    """Build and test branch chapter-NN in a worktree; returns what failed."""
    tree = work / f"chapter-{chapter}"
    git("worktree", "add", "-q", "--detach", str(tree), f"chapter-{chapter}", root=clone)
    for rel in FETCHED:
        if (REPO_ROOT / rel).is_file():
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / rel, tree / rel)
    env = os.environ | {"NO_MKDOCS_2_WARNING": "1"}
    failed = []
    site = work / f"site-{chapter}"
    if run([PYTHON, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(site)], tree, env):
        env = env | {"MINISGL_BUILT_SITE": str(site)}
    else:
        failed.append(f"chapter-{chapter}: the book does not build with --strict")
        env = {k: v for k, v in env.items() if k != "MINISGL_BUILT_SITE"}
    pytest = [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if full:
        if not run(pytest + ["tests", f"chapters/{chapter}"], tree, env | IDENTITY):
            failed.append(f"chapter-{chapter}: its tests fail (pytest tests chapters/{chapter})")
        return failed
    if not run(pytest + ["tests"], tree, env | IDENTITY):
        failed.append(f"chapter-{chapter}: its repository checks fail (pytest tests)")
    if not run(pytest + ["--collect-only", f"chapters/{chapter}"], tree, env):
        failed.append(f"chapter-{chapter}: its tests do not load (pytest --collect-only chapters/{chapter})")
    tests = f"chapters/{chapter}/tests"
    checks = [f"{tests}/{name}" for name in IMPORT_CHECKS if (tree / tests / name).is_file()]
    if checks and not run(pytest + checks, tree, env):
        failed.append(f"chapter-{chapter}: its import checks fail (pytest {' '.join(checks)})")
    return failed


def main() -> None:
    full = "--full" in sys.argv[1:]
    wanted = [arg for arg in sys.argv[1:] if arg != "--full"]
    failed = []
    with tempfile.TemporaryDirectory(prefix="minisgl-branches-") as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(clone)], check=True)
        git("checkout", "-q", "--detach", root=clone)  # `branches` refuses to replace the branch checked out
        made = subprocess.run([PYTHON, "tools/chapters.py", "branches"], cwd=clone, capture_output=True, text=True,
                              env=os.environ | IDENTITY, check=False)
        if made.returncode != 0:
            sys.exit(f"could not make the branches: {made.stderr.strip()}")
        numbers = [line.split()[0].removeprefix("chapter-") for line in made.stdout.splitlines() if line.strip()]
        for chapter in numbers:
            if wanted and chapter not in wanted:
                continue
            if chapter == numbers[-1]:
                print(f"chapter-{chapter}: the newest chapter; its branch has main's tree, which the other steps check")
                continue
            started = time.perf_counter()
            problems = check_branch(clone, chapter, Path(tmp), full)
            verdict = "FAILED" if problems else "ok"
            print(f"chapter-{chapter}: {verdict} in {time.perf_counter() - started:.0f}s", flush=True)
            failed += problems
    if failed:
        sys.exit("\n".join(["chapter branches failed:", *failed]))
    passed = "tests" if full else "repository and import checks"
    print(f"every chapter branch builds its book and passes its {passed}")


if __name__ == "__main__":
    main()
