"""Create a learner workspace for a chapter: ``learn/NN/minisgl``, with every exercise stubbed out.

    python tools/learn.py 01            # or: make learn CHAPTER=01
    pytest chapters/01 --learn          # red at first: write the exercises until it is green
    pytest chapters/01 --learn -k rope  # one exercise at a time

The workspace is a copy of the chapter's reference snapshot in which the body of each exercise
(marked ``# --8<-- [start:ex-NAME]`` / ``# --8<-- [end:ex-NAME]``) raises ``NotImplementedError``.
An existing workspace is never overwritten unless you pass ``--force`` (``make learn CHAPTER=NN FORCE=1``;
your work would be lost).
"""

import argparse
import os
import shutil
import sys
from pathlib import Path

from course import LEARN_DIR, REPO_ROOT, chapter_exercises, chapters, snapshot_root, stub_exercises


def make_workspace(chapter: str, target: Path, only: set[str] | None = None) -> list[str]:
    """Copy chapter's snapshot into ``target/minisgl`` and stub its exercises (or only those in
    ``only``); returns the names of the stubbed exercises."""
    source = snapshot_root(chapter) / "minisgl"
    shutil.copytree(source, target / "minisgl", ignore=shutil.ignore_patterns("__pycache__"))
    names = set(chapter_exercises(chapter)) if only is None else set(only)
    for path in (target / "minisgl").rglob("*.py"):
        path.write_text(stub_exercises(path.read_text(), chapter, names))
    return sorted(names)


def pytest_command() -> str:
    """How to run pytest from the repository root with the Python that runs this script (the course's venv)."""
    interpreter = Path(sys.executable)
    pytest = interpreter.parent / "pytest"
    shown = pytest if os.access(pytest, os.X_OK) else f"{interpreter} -m pytest"
    try:
        return str(Path(shown).relative_to(REPO_ROOT)) if isinstance(shown, Path) else shown
    except ValueError:  # a Python outside the repository: show its full path
        return str(shown)


def main() -> None:
    parser = argparse.ArgumentParser(description="Create a learner workspace for a chapter.")
    parser.add_argument("chapter", help="chapter number, e.g. 01")
    parser.add_argument("--force", action="store_true", help="replace an existing workspace (loses your work)")
    args = parser.parse_args()
    chapter = args.chapter.zfill(2)
    if chapter not in chapters():
        sys.exit(f"error: no chapter {chapter}; chapters are {', '.join(chapters())}")
    target = LEARN_DIR / chapter
    if target.exists():
        if not args.force:
            sys.exit(
                f"error: {target} exists; keep working in it, or start over with `make learn CHAPTER={chapter} "
                f"FORCE=1` (or `python tools/learn.py {chapter} --force`; either loses your work)"
            )
        shutil.rmtree(target)
    names = make_workspace(chapter, target)
    pytest = pytest_command()
    print(f"workspace ready: {target / 'minisgl'}")
    print(f"exercises: {', '.join(names)}")
    print(f"test all:  {pytest} chapters/{chapter} --learn")
    print(f"test one:  {pytest} chapters/{chapter} --learn -k {names[0]} -x")


if __name__ == "__main__":
    main()
