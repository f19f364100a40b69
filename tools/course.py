"""Shared facts about the course's layout, used by the other tools (introduced in chapter 01)."""

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CHAPTERS_DIR = REPO_ROOT / "chapters"
LEARN_DIR = REPO_ROOT / "learn"

# `# --8<-- [start:ex-rope]` ... `# --8<-- [end:ex-rope]`: region markers, which the book's hook
# (tools/book.py) also reads to pull code from the snapshot.
EXERCISE_START = re.compile(r"^(?P<indent>\s*)# --8<-- \[start:ex-(?P<name>[\w-]+)\]\s*$")
EXERCISE_END = re.compile(r"^\s*# --8<-- \[end:ex-(?P<name>[\w-]+)\]\s*$")


def chapters(root: Path = REPO_ROOT) -> list[str]:
    """Chapter numbers, in order: "01", "02", ... (``root`` is the repository, or a test's fake of it)."""
    chapters_dir = root / "chapters"
    return sorted(p.name for p in chapters_dir.iterdir() if p.is_dir() and re.fullmatch(r"\d\d", p.name))


def snapshot_root(chapter: str, root: Path = REPO_ROOT) -> Path:
    """The folder holding chapter's ``minisgl/``: its frozen copy, or the top level for the newest chapter."""
    chapter_dir = root / "chapters" / chapter
    return chapter_dir if (chapter_dir / "minisgl").is_dir() else root


def exercises(package: Path) -> dict[str, Path]:
    """Every exercise name in a ``minisgl/`` folder -> the file that holds it."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        for line in path.read_text().splitlines():
            if match := EXERCISE_START.match(line):
                found[match["name"]] = path
    return found


def tested_exercises(chapter: str) -> set[str]:
    """The exercise names that chapter's tests mark with ``@pytest.mark.exercise(...)``."""
    names = set()
    for path in (CHAPTERS_DIR / chapter / "tests").rglob("*.py"):
        for args in re.findall(r"mark\.exercise\(([^)]*)\)", path.read_text()):
            names.update(re.findall(r"[\"']([\w-]+)[\"']", args))
    return names


def chapter_exercises(chapter: str) -> dict[str, Path]:
    """The exercises of one chapter: the marked regions its tests check.

    A snapshot also carries the markers of earlier chapters' exercises, in files it did not change;
    those stay solved in this chapter's workspace.
    """
    tested = tested_exercises(chapter)
    return {name: path for name, path in exercises(snapshot_root(chapter) / "minisgl").items() if name in tested}


def stub_exercises(source: str, chapter: str, only: set[str] | None = None) -> str:
    """Replace the body of each exercise region in ``source`` with a ``NotImplementedError``.

    The markers stay, so a learner sees where to write; ``only`` limits which exercises are stubbed.
    """
    out, inside = [], None
    for line in source.splitlines(keepends=True):
        if inside is None and (match := EXERCISE_START.match(line)):
            out.append(line)
            if only is None or match["name"] in only:
                inside = match["name"]
                out.append(
                    f'{match["indent"]}raise NotImplementedError("exercise \'{inside}\' of chapter {chapter} is yours '
                    f'to write: see the book, chapter {chapter}, section Exercises")\n'
                )
            continue
        if inside is not None:
            if (end := EXERCISE_END.match(line)) and end["name"] == inside:
                out.append(line)
                inside = None
            continue
        out.append(line)
    if inside is not None:
        raise ValueError(f"exercise {inside!r} has a start marker and no end marker")
    return "".join(out)
