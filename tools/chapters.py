"""Chapter tooling: what each chapter changes, the drift check, carrying fixes, freezing, chapter branches.

    python tools/chapters.py diff 01 02          # what chapter 02 changes, as a unified diff
    python tools/chapters.py diff 01 02 --stat   # the same, one line per file
    python tools/chapters.py diff 01 02 --book   # the diff the book shows: no markers, exercise bodies stubbed
    python tools/chapters.py check               # the drift check (tests/test_chapters.py runs it too)
    python tools/chapters.py carry 01            # carry the fixes made in chapters/01/minisgl to later chapters
    python tools/chapters.py carry 01 kv_cache.py --base HEAD~1   # the same for a fix committed already
    python tools/chapters.py freeze 02           # before chapter 03 begins: copy minisgl/ to chapters/02/
    python tools/chapters.py branches            # local git branches chapter-01, chapter-02, ...

Every chapter's code is the whole package ``minisgl`` (its "snapshot"): ``chapters/NN/minisgl/`` once
a later chapter has frozen it, the top-level ``minisgl/`` for the newest chapter. Snapshots are
copies, so a fix made in one stage must be carried to every later stage that has the same code:
``carry`` does it (a copy where the later file is still the old version, a three-way merge where the
later chapter changed it). The drift check keeps the copies honest. Each chapter NN >= 02 lists in
``chapters/NN/changed.txt`` every file it adds, changes or removes relative to chapter NN-1, one
path per line, relative to the package folder (``kv_cache.py``, ``layers/attention.py``); a file the
chapter moves is one line ``old -> new`` (``scheduler/text_stream.py -> tokenizer/text_stream.py``);
``#`` starts a comment, so a line may say why. ``check`` fails, naming the files, when

- a file that both chapters have differs and is not listed (a fix not carried over, or a change the
  chapter forgot to declare), or a file is added or removed and not listed;
- a listed file is in fact identical in both chapters (a stale list), or in neither;
- a listed move ``old -> new`` is not one: ``old`` must exist only in the older chapter, ``new`` only
  in the newer.

The diffs detect moved files the way git does: a removed file and an added file that are at least
half alike are one file renamed, shown as git's rename (``rename from``/``rename to`` and only the
lines that changed), which ``git apply`` understands.

The book shows each chapter's diff, and a table of its files, on the chapter's page ("What changed
since the last chapter"), generated at build time by ``book_diff`` without the region marker comments
and with every exercise's body stubbed, as the walkthrough shows it.
"""

import argparse
import difflib
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from course import CHAPTERS_DIR, REPO_ROOT, chapters, snapshot_root

# ------------------------------------------------------------------------------------------------
# Diffs between two snapshots
# ------------------------------------------------------------------------------------------------


def package_files(package: Path) -> dict[str, Path]:
    """Every file of a ``minisgl/`` folder, by its path relative to that folder ("layers/norm.py")."""
    return {
        path.relative_to(package).as_posix(): path
        for path in sorted(package.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def changed_files(old: Path, new: Path) -> dict[str, str]:
    """Files that differ between two package folders -> "added", "removed" or "changed"."""
    before, after = package_files(old), package_files(new)
    found = {}
    for rel in sorted(before.keys() | after.keys()):
        if rel not in before:
            found[rel] = "added"
        elif rel not in after:
            found[rel] = "removed"
        elif before[rel].read_bytes() != after[rel].read_bytes():
            found[rel] = "changed"
    return found


def file_mode(path: Path) -> str:
    return "100755" if os.access(path, os.X_OK) else "100644"


def text_lines(path: Path) -> list[str] | None:
    """A text file's lines, each with its newline; None for a file that is not UTF-8 text."""
    try:
        return path.read_text(encoding="utf-8").splitlines(keepends=True)
    except UnicodeDecodeError:
        return None


def similarity(a: Path, b: Path) -> float:
    """How alike two files are, from 0 to 1: the share of their lines that match (1 only when equal)."""
    lines_a, lines_b = text_lines(a), text_lines(b)
    if lines_a is None or lines_b is None:
        return float(a.read_bytes() == b.read_bytes())
    return difflib.SequenceMatcher(None, lines_a, lines_b, autojunk=False).ratio()


# A removed file and an added file at least this alike are one file moved: git's default threshold.
RENAME_THRESHOLD = 0.5


def renames(old: Path, new: Path) -> dict[str, str]:
    """Files moved between two package folders: their path in ``old`` -> their path in ``new``.

    Every file removed in ``new`` is compared with every file added; the most alike pairs are matched
    first, each file at most once, and only pairs at least ``RENAME_THRESHOLD`` alike count. Empty
    files are left out: an empty file is exactly like every other one, which says nothing of a move.
    """
    status = changed_files(old, new)
    removed = [rel for rel, s in status.items() if s == "removed" and (old / rel).stat().st_size]
    added = [rel for rel, s in status.items() if s == "added" and (new / rel).stat().st_size]
    scored = [(similarity(old / a, new / b), a, b) for a in removed for b in added]
    found: dict[str, str] = {}
    for score, a, b in sorted(scored, key=lambda candidate: -candidate[0]):  # stable: ties stay in path order
        if score >= RENAME_THRESHOLD and a not in found and b not in found.values():
            found[a] = b
    return dict(sorted(found.items()))


def file_diff(old: Path, new: Path, old_rel: str | None, new_rel: str | None) -> list[str]:
    """One file's diff between package folders ``old`` and ``new``, in git's format (``git apply`` reads it).

    ``old_rel`` is None for a file the new chapter adds, ``new_rel`` is None for one it removes, and two
    different paths are a file it moves.
    """
    a_name, b_name = f"minisgl/{old_rel or new_rel}", f"minisgl/{new_rel or old_rel}"
    before_path = old / old_rel if old_rel else None
    after_path = new / new_rel if new_rel else None
    lines = [f"diff --git a/{a_name} b/{b_name}\n"]
    if before_path is None:
        lines.append(f"new file mode {file_mode(after_path)}\n")
    elif after_path is None:
        lines.append(f"deleted file mode {file_mode(before_path)}\n")
    elif old_rel != new_rel:
        percent = int(similarity(before_path, after_path) * 100)  # rounded down: 100 only when equal
        lines += [f"similarity index {percent}%\n", f"rename from {a_name}\n", f"rename to {b_name}\n"]
        if percent == 100:
            return lines  # the same content under a new name: nothing more to show (it may not be text)
    before = text_lines(before_path) if before_path else []
    after = text_lines(after_path) if after_path else []
    from_name = f"a/{a_name}" if before_path else "/dev/null"
    to_name = f"b/{b_name}" if after_path else "/dev/null"
    if before is None or after is None:
        return lines + [f"Binary files {from_name} and {to_name} differ\n"]
    for line in difflib.unified_diff(before, after, fromfile=from_name, tofile=to_name):
        # The last line of a file may lack its newline; say so the way diff and git do.
        lines.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return lines


def package_diff(old: Path, new: Path) -> str:
    """The unified diff from package folder ``old`` to ``new``, file by file in path order.

    A moved file shows once, as a rename, in the place of its new path.
    """
    moved = renames(old, new)
    moved_from = {new_rel: old_rel for old_rel, new_rel in moved.items()}
    out = []
    for rel, status in changed_files(old, new).items():
        if rel in moved_from:
            out += file_diff(old, new, moved_from[rel], rel)
        elif status == "added":
            out += file_diff(old, new, None, rel)
        elif status == "removed" and rel not in moved:
            out += file_diff(old, new, rel, None)
        elif status == "changed":
            out += file_diff(old, new, rel, rel)
    return "".join(out)


def diff_counts(diff: str) -> list[dict]:
    """Per file of a diff: its ``path`` (in the newer chapter), ``from`` (its old path if it moved, else
    None), ``change`` ("new", "changed", "moved", "removed"), and the lines ``added`` and ``removed``."""
    files: list[dict] = []
    in_hunk = False
    for line in diff.splitlines():
        if line.startswith("diff --git a/"):
            a_name, b_name = line.removeprefix("diff --git a/").split(" b/", 1)
            moved = a_name != b_name
            files.append({"path": b_name, "from": a_name if moved else None, "change": "moved" if moved else "changed",
                          "added": 0, "removed": 0})
            in_hunk = False
        elif not in_hunk and line.startswith("new file mode"):
            files[-1]["change"] = "new"
        elif not in_hunk and line.startswith("deleted file mode"):
            files[-1]["change"] = "removed"
        elif line.startswith("@@"):
            in_hunk = True  # before the first hunk come the file names (--- a/..., +++ b/...)
        elif in_hunk and line.startswith("+"):
            files[-1]["added"] += 1
        elif in_hunk and line.startswith("-"):
            files[-1]["removed"] += 1
    return files


def diff_stat(diff: str) -> str:
    """One line per file (how many lines it adds and removes) and a total, like ``git diff --stat``.

    A moved file is one line ``old => new``.
    """
    counts = {
        (f["path"] if f["from"] is None else f"{f['from']} => {f['path']}"): (f["added"], f["removed"])
        for f in diff_counts(diff)
    }
    if not counts:
        return " no file changes\n"
    width = max(len(name) for name in counts)
    largest = max(sum(c) for c in counts.values()) or 1
    scale = min(1.0, 50 / largest)  # at most 50 characters of + and -
    out = []
    for name, (added, removed) in counts.items():
        bar = "+" * round(added * scale) + "-" * round(removed * scale)
        out.append(f" {name:<{width}} | {added + removed:5} {bar}\n")
    total_added = sum(c[0] for c in counts.values())
    total_removed = sum(c[1] for c in counts.values())
    out.append(f" {len(counts)} files changed, {total_added} insertions(+), {total_removed} deletions(-)\n")
    return "".join(out)


def chapter_package(chapter: str, root: Path = REPO_ROOT) -> Path:
    return snapshot_root(chapter, root) / "minisgl"


def chapter_diff(old: str, new: str) -> str:
    return package_diff(chapter_package(old), chapter_package(new))


# ------------------------------------------------------------------------------------------------
# The diff the book shows
# ------------------------------------------------------------------------------------------------

# A region marker comment, ``# --8<-- [start:name]`` or ``# --8<-- [end:name]``: for tools, not readers.
REGION_MARKER = re.compile(r"^\s*#\s*-+8<-+\s*\[(?P<kind>start|end):(?P<name>[\w-]+)\]\s*$")
# What the book shows in place of an exercise's body (a region ``ex-NAME``): the walkthrough and the diffs.
BOOK_STUB = "raise NotImplementedError  # exercise {name}: yours to write"


def as_the_book_shows(lines: list[str], exercises: set[str] | None = None) -> tuple[list[str], list[str]]:
    """Source lines as the book shows them: no region marker lines, the body of each exercise in
    ``exercises`` (every one when None) replaced by one ``BOOK_STUB`` line, indented like its marker.

    The lines may keep their line ends or not; the stub takes its marker's. Returns the lines and the
    names of the exercises stubbed, in order.
    """
    out, stubbed, inside = [], [], None
    for line in lines:
        marker = REGION_MARKER.match(line)
        if inside is not None:
            if marker and marker["kind"] == "end" and marker["name"] == f"ex-{inside}":
                inside = None
            continue
        if not marker:
            out.append(line)
            continue
        name = marker["name"].removeprefix("ex-")
        if marker["kind"] == "start" and marker["name"].startswith("ex-") and (exercises is None or name in exercises):
            inside = name
            text = line.rstrip("\r\n")
            indent = text[: len(text) - len(text.lstrip())]
            out.append(indent + BOOK_STUB.format(name=name) + line[len(text):])
            stubbed.append(name)
    if inside is not None:
        raise ValueError(f"exercise {inside!r} has a start marker and no end marker")
    return out, stubbed


def without_region_markers(package: Path, into: Path) -> Path:
    """A copy of a package folder as the book's diffs show it; returns the copy.

    Its Python files have no region marker lines, and every exercise's body is the book's stub (in any
    chapter's copy, so that no diff shows an answer: the reader sees that a function changed, not how).
    """
    for rel, path in package_files(package).items():
        target = into / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".py":
            lines, _ = as_the_book_shows(path.read_text(encoding="utf-8").splitlines(keepends=True))
            target.write_text("".join(lines), encoding="utf-8")
        else:
            shutil.copy2(path, target)
    return into


def book_diff(old: str, new: str) -> str:
    """The diff from chapter ``old`` to ``new`` as the book shows it: the region markers left out, every
    exercise's body stubbed on both sides.

    The book generates it at build time (tools/book.py), so there is no stored copy to keep up to date.
    """
    with tempfile.TemporaryDirectory() as tmp:
        before = without_region_markers(chapter_package(old), Path(tmp) / "old")
        after = without_region_markers(chapter_package(new), Path(tmp) / "new")
        return package_diff(before, after)


def consecutive_pairs() -> list[tuple[str, str]]:
    numbers = chapters()
    return list(itertools.pairwise(numbers))


# ------------------------------------------------------------------------------------------------
# The drift check
# ------------------------------------------------------------------------------------------------


def read_changed_list(path: Path) -> list[str]:
    """The entries of a changed.txt, in order; ``#`` starts a comment, blank lines are skipped.

    An entry is a path (``kv_cache.py``) or a move (``scheduler/text_stream.py -> tokenizer/text_stream.py``).
    """
    listed = []
    for line in path.read_text(encoding="utf-8").splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry:
            listed.append(entry)
    return listed


MOVE = "->"


def entry_paths(entry: str) -> list[str]:
    """The paths one changed.txt entry names: one, or two (old, new) for a move."""
    return [part.strip() for part in entry.split(MOVE)]


def declared_moves(listed: list[str]) -> dict[str, str]:
    """The moves a changed.txt declares: old path -> new path."""
    moves = [entry_paths(entry) for entry in listed if MOVE in entry]
    return {paths[0]: paths[1] for paths in moves if len(paths) == 2}


def move_problem(entry: str, before: dict, after: dict) -> str | None:
    """What is wrong with a listed move ``old -> new``, or None: old must be gone, new must be new."""
    paths = entry_paths(entry)
    if len(paths) != 2 or not all(paths):
        return f"{entry}: neither a path nor a move `old -> new`"
    old, new = paths
    why = []
    if old not in before:
        why.append(f"the previous chapter has no {old}")
    elif old in after:
        why.append(f"{old} is still here")
    if new not in after:
        why.append(f"this chapter has no {new}")
    elif new in before:
        why.append(f"the previous chapter has {new} already")
    return f"{old} -> {new}: listed as a move, but {' and '.join(why)}" if why else None


def drift_problems(old: Path, new: Path, listed: list[str]) -> list[str]:
    """Compare two package folders with the list of files the newer one declares as changed.

    Returns one message per problem (empty when the list is exactly the set of files that differ).
    A move ``a -> b`` accounts for ``a`` removed and ``b`` added; it need not be one ``renames``
    detects (a file moved and mostly rewritten is still moved), and listing ``a`` and ``b`` on lines
    of their own is fine too. This is the heart of the drift check; it takes plain folders so a test
    can hand it fake ones.
    """
    problems = []
    actual = changed_files(old, new)
    before, after = package_files(old), package_files(new)
    seen = set()
    for entry in listed:
        for rel in entry_paths(entry):
            if rel in seen:
                problems.append(f"{rel}: listed twice")
            seen.add(rel)
    for entry in listed:
        if MOVE in entry and (problem := move_problem(entry, before, after)):
            problems.append(problem)
    moved = renames(old, new)
    moved_from = {new_rel: old_rel for old_rel, new_rel in moved.items()}
    for rel, status in actual.items():
        if rel in seen:
            continue
        if status == "changed":
            problems.append(
                f"{rel}: differs from the previous chapter but is not listed "
                "(a fix not carried over to this chapter, or a change it forgot to declare)"
            )
        elif rel in moved or rel in moved_from:
            a, b = (rel, moved[rel]) if rel in moved else (moved_from[rel], rel)
            problems.append(f"{rel}: {status} in this chapter but not listed (moved? list `{a} {MOVE} {b}`)")
        else:
            problems.append(f"{rel}: {status} in this chapter but not listed")
    plain = {entry for entry in listed if MOVE not in entry}
    for rel in sorted(plain - actual.keys()):
        if rel in before or rel in after:
            problems.append(f"{rel}: listed, but identical in both chapters (a stale list: remove the line)")
        else:
            problems.append(f"{rel}: listed, but neither chapter has it (a typo?)")
    return problems


def check() -> list[str]:
    """The whole drift check of the repository: every chapter's changed.txt."""
    problems = []
    for old, new in consecutive_pairs():
        changed_txt = CHAPTERS_DIR / new / "changed.txt"
        if not changed_txt.is_file():
            problems.append(f"chapters/{new}/changed.txt is missing: list the files chapter {new} changes")
            continue
        for problem in drift_problems(chapter_package(old), chapter_package(new), read_changed_list(changed_txt)):
            problems.append(f"chapters/{new}/changed.txt: minisgl/{problem}")
    return problems


# ------------------------------------------------------------------------------------------------
# Carrying a fix to the later chapters
# ------------------------------------------------------------------------------------------------

CONFLICT = "conflict"


def committed(rev: str, path: str, root: Path = REPO_ROOT) -> bytes | None:
    """A file's content as committed in ``rev`` (``path`` from the repository root), or None if it has none."""
    result = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True, check=False)
    return result.stdout if result.returncode == 0 else None


def later_copies(chapter: str, rel: str, root: Path = REPO_ROOT) -> list[tuple[str, Path]]:
    """Where file ``rel`` of chapter's snapshot is in each later chapter: (chapter, path) in order.

    Follows the moves each later chapter declares in its changed.txt. A path may not exist: that
    chapter removed the file (or moved it without declaring the move).
    """
    numbers = chapters(root)
    copies = []
    for number in numbers[numbers.index(chapter) + 1 :]:
        changed_txt = root / "chapters" / number / "changed.txt"
        if changed_txt.is_file():
            rel = declared_moves(read_changed_list(changed_txt)).get(rel, rel)
        copies.append((number, chapter_package(number, root) / rel))
    return copies


def carry_change(base: bytes, fixed: bytes, target: Path) -> str:
    """Make in ``target`` the change from ``base`` to ``fixed``; returns what happened, in words.

    ``target`` still equal to ``base`` gets ``fixed`` as it is. Otherwise git's three-way merge puts
    the change into the target's own version; on a conflict the target is left as it was.
    """
    current = target.read_bytes()
    if current == fixed:
        return "has the change already"
    if current == base:
        target.write_bytes(fixed)
        return "copied (it was the version before the change)"
    with tempfile.TemporaryDirectory() as tmp:
        base_file, fixed_file = Path(tmp) / "base", Path(tmp) / "fixed"
        base_file.write_bytes(base)
        fixed_file.write_bytes(fixed)
        command = ["git", "merge-file", "-p", target, base_file, fixed_file]
        merge = subprocess.run(command, capture_output=True, check=False)
    if merge.returncode == 0:
        target.write_bytes(merge.stdout)
        return "merged into this chapter's version (read the result)"
    if 0 < merge.returncode < 128:  # git merge-file exits with the number of conflicts
        return f"{CONFLICT}: the change overlaps this chapter's own edits; left untouched"
    raise RuntimeError(f"git merge-file failed on {target}: {merge.stderr.decode().strip()}")


def carry(
    chapter: str, files: list[str] | None = None, base: str = "HEAD", root: Path = REPO_ROOT
) -> tuple[list[str], list[str]]:
    """Carry the changes made in chapter's snapshot into the same files of every later snapshot.

    ``files`` are paths inside the package; by default every file of ``chapters/NN/minisgl`` that
    differs from its version in git revision ``base``. That committed version is the merge base:
    the change from it to the working tree's file is made in each later copy (``carry_change``),
    following declared moves, and no further than a chapter that removed the file. Returns a line per
    file and later copy, for printing, and the copies left untouched because of a conflict.
    """
    prefix = f"chapters/{chapter}/minisgl/"
    if not (root / prefix).is_dir():
        raise ValueError(f"chapter {chapter} has no frozen snapshot ({prefix}): there is no later chapter to carry to")
    if files is None:
        changed = git("diff", "--name-only", "--diff-filter=M", base, "--", prefix, root=root)
        files = [path.removeprefix(prefix) for path in changed.splitlines()]
    report, conflicts = [], []
    for rel in files:
        source = root / prefix / rel
        before = committed(base, prefix + rel, root)
        if before is None or not source.is_file():
            report.append(f"{prefix}{rel}: not in both {base} and the working tree: nothing to carry")
            continue
        fixed = source.read_bytes()
        if fixed == before:
            report.append(f"{prefix}{rel}: the same as in {base}: nothing to carry")
            continue
        report.append(f"{prefix}{rel}: changed since {base}; carrying the change to")
        for number, target in later_copies(chapter, rel, root):
            shown = target.relative_to(root).as_posix()
            if not target.is_file():
                why = f"removed in chapter {number}, or moved without `old {MOVE} new` in its changed.txt"
                report.append(f"  {shown}: not there ({why}): carried no further")
                break
            outcome = carry_change(before, fixed, target)
            report.append(f"  {shown}: {outcome}")
            if outcome.startswith(CONFLICT):
                conflicts.append(shown)
    return report, conflicts


# ------------------------------------------------------------------------------------------------
# Freezing the newest chapter
# ------------------------------------------------------------------------------------------------

# An inline snippet whose path is in the package: `--8<-- "minisgl/...`, with either quote.
INLINE_SNIPPET = r"""(-+8<-+[ \t]+["']){prefix}"""


def rewrite_snippet_paths(page: str, old_prefix: str, new_prefix: str) -> str:
    """Point a book page's snippets at another copy of the package (``minisgl/`` <-> ``chapters/NN/minisgl/``).

    Handles inline snippets (``--8<-- "minisgl/kv_cache.py"``) and the paths inside a block snippet
    (lines between two ``--8<--`` lines).
    """
    inline = re.compile(INLINE_SNIPPET.format(prefix=re.escape(old_prefix)))
    out, in_block = [], False
    for line in page.splitlines(keepends=True):
        if line.strip() == "--8<--":
            in_block = not in_block
        elif in_block and line.lstrip().startswith(old_prefix):
            line = line.replace(old_prefix, new_prefix, 1)
        else:
            line = inline.sub(lambda m: m[1] + new_prefix, line)
        out.append(line)
    return "".join(out)


def freeze(chapter: str, root: Path = REPO_ROOT) -> list[str]:
    """Copy ``root/minisgl`` to ``root/chapters/NN/minisgl`` and point the chapter's book page at the copy.

    Refuses (FileExistsError) when the copy exists. Returns what it did, for printing.
    """
    target = root / "chapters" / chapter / "minisgl"
    if target.exists():
        raise FileExistsError(f"{target.relative_to(root)} exists: chapter {chapter} is frozen already")
    shutil.copytree(root / "minisgl", target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    done = [f"copied minisgl/ to chapters/{chapter}/minisgl/"]
    page = root / "docs" / "chapters" / f"{chapter}.md"
    if page.is_file():
        text = page.read_text(encoding="utf-8")
        new = rewrite_snippet_paths(text, "minisgl/", f"chapters/{chapter}/minisgl/")
        page.write_text(new, encoding="utf-8")
        done.append(f"pointed the snippets of docs/chapters/{chapter}.md at the copy")
    else:
        done.append(f"no docs/chapters/{chapter}.md to update")
    return done


# ------------------------------------------------------------------------------------------------
# Chapter branches
# ------------------------------------------------------------------------------------------------


def git(*args: str, env: dict | None = None, stdin: str | None = None, root: Path = REPO_ROOT, raw=False) -> str:
    """Run git in ``root``; returns its output (stripped, unless ``raw``), or raises RuntimeError."""
    result = subprocess.run(["git", *args], cwd=root, env=env, input=stdin, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout if raw else result.stdout.strip()


def in_head(path: str, root: Path = REPO_ROOT) -> bool:
    """Whether HEAD's tree has ``path`` (a file or a folder)."""
    found = subprocess.run(["git", "cat-file", "-e", f"HEAD:{path}"], cwd=root, capture_output=True, check=False)
    return found.returncode == 0


# A chapter's pages in the book: docs/chapters/NN.md and its notebook, docs/chapters/NN-notebook.ipynb (and the
# course's epilogue, docs/chapters/NN-epilogue.md, which follows the last chapter and goes with it).
PAGE_SUFFIXES = (".md", "-notebook.ipynb", "-epilogue.md")


def nav_without(config: str, numbers: list[str]) -> str:
    """mkdocs.yml without the nav entries of chapters ``numbers`` (lines naming ``chapters/NN.md`` or its notebook)."""
    pages = tuple(f"chapters/{n}{suffix}" for n in numbers for suffix in PAGE_SUFFIXES)
    return "".join(line for line in config.splitlines(keepends=True) if not line.rstrip().endswith(pages))


def make_branches(root: Path = REPO_ROOT) -> list[str]:
    """Create or replace ``chapter-NN`` for every chapter committed in HEAD; returns a line per branch.

    Branch chapter-NN is one commit on top of HEAD whose tree is HEAD's with
      - the top-level ``minisgl/`` replaced by chapter NN's snapshot (``chapters/NN/minisgl``),
      - that copy removed (it is now the top level) and the chapter's page pointed back at ``minisgl/``,
      - the folders of the later chapters removed, with their book pages and notebooks, and their
        entries in the book's nav (mkdocs.yml), so that the branch's book builds with ``--strict``.
        (Links to the pages that are gone become plain text when the book is built: tools/book.py.)
    Only git plumbing on a temporary index file is used: the working tree and the real index are never
    touched, and only committed files count (uncommitted edits are not in the branches).
    """
    head = git("rev-parse", "--verify", "HEAD^{commit}", root=root)
    symbolic_ref = ["git", "symbolic-ref", "-q", "HEAD"]  # fails on a detached HEAD: then no branch is checked out
    current = subprocess.run(symbolic_ref, cwd=root, capture_output=True, text=True, check=False)
    if current.stdout.strip().startswith("refs/heads/chapter-"):
        raise RuntimeError(f"you are on {current.stdout.strip()[11:]}, a generated branch: switch to main first")
    listing = git("ls-tree", "-d", "--name-only", "HEAD", "chapters/", root=root).splitlines()
    numbers = sorted(p.split("/")[1] for p in listing if re.fullmatch(r"chapters/\d\d", p))
    report = []
    for i, chapter in enumerate(numbers):
        frozen = in_head(f"chapters/{chapter}/minisgl", root)
        later = [f"chapters/{n}" for n in numbers[i + 1 :]]
        with tempfile.TemporaryDirectory() as tmp:
            env = os.environ | {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            git("read-tree", head, env=env, root=root)  # the temporary index = HEAD's tree
            later_pages = [f"docs/chapters/{n}{suffix}" for n in numbers[i + 1 :] for suffix in PAGE_SUFFIXES]
            remove = later + later_pages + (["minisgl", f"chapters/{chapter}/minisgl"] if frozen else [])
            if remove:
                git("rm", "--cached", "-r", "-q", "--ignore-unmatch", "--", *remove, env=env, root=root)
            if later and in_head("mkdocs.yml", root):
                config = git("cat-file", "blob", f"{head}:mkdocs.yml", root=root, raw=True)
                blob = git("hash-object", "-w", "--stdin", stdin=nav_without(config, numbers[i + 1 :]), root=root)
                git("update-index", "--cacheinfo", f"100644,{blob},mkdocs.yml", env=env, root=root)
            if frozen:
                # The snapshot's tree, already stored in git, becomes the top-level minisgl/.
                git("read-tree", "--prefix=minisgl/", f"{head}:chapters/{chapter}/minisgl", env=env, root=root)
                page = f"docs/chapters/{chapter}.md"
                if in_head(page, root):
                    text = git("cat-file", "blob", f"{head}:{page}", root=root, raw=True)
                    new = rewrite_snippet_paths(text, f"chapters/{chapter}/minisgl/", "minisgl/")
                    if new != text:
                        blob = git("hash-object", "-w", "--stdin", stdin=new, root=root)
                        git("update-index", "--cacheinfo", f"100644,{blob},{page}", env=env, root=root)
            tree = git("write-tree", env=env, root=root)
        message = (
            f"Chapter {chapter}: the repository as of the end of chapter {chapter}\n\n"
            f"Made by `python tools/chapters.py branches` from {head[:12]}: minisgl/ is chapter {chapter}'s "
            f"snapshot{'; later chapters removed' if later else ''}.\n"
        )
        commit = git("commit-tree", tree, "-p", head, stdin=message, root=root)
        git("update-ref", f"refs/heads/chapter-{chapter}", commit, root=root)
        source = f"chapters/{chapter}/minisgl" if frozen else "minisgl (the newest chapter)"
        report.append(f"chapter-{chapter}  {commit[:12]}  minisgl/ = {source}")
    return report


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------


def chapter_number(text: str) -> str:
    number = text.zfill(2)
    if number not in chapters():
        raise argparse.ArgumentTypeError(f"no chapter {number}; chapters are {', '.join(chapters())}")
    return number


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    diff = commands.add_parser("diff", help="the unified diff between two chapters' snapshots")
    diff.add_argument("old", nargs="?", type=chapter_number, help="e.g. 01 (default: the second newest chapter)")
    diff.add_argument("new", nargs="?", type=chapter_number, help="e.g. 02 (default: the newest chapter)")
    diff.add_argument("--stat", action="store_true", help="one line per file instead of the diff")
    diff.add_argument("--book", action="store_true",
                      help="the diff the book shows: no region markers, every exercise's body stubbed")

    commands.add_parser("check", help="fail if a chapter's changed.txt disagrees with the code")

    carry_cmd = commands.add_parser("carry", help="carry fixes made in chapter NN's snapshot into the later chapters")
    carry_cmd.add_argument("chapter", type=chapter_number, help="the chapter whose snapshot has the fix, e.g. 01")
    carry_cmd.add_argument(
        "files", nargs="*", help="paths inside its minisgl/ (default: every file that differs from --base)"
    )
    carry_cmd.add_argument("--base", default="HEAD", help="the git revision with the version before the fix")

    freeze_cmd = commands.add_parser("freeze", help="copy minisgl/ to chapters/NN/minisgl before chapter NN+1 begins")
    freeze_cmd.add_argument("chapter", type=chapter_number, help="the newest chapter, e.g. 02")

    commands.add_parser(
        "branches",
        help="create or replace local branches chapter-NN (from committed files only)",
        description="Create or replace local branches chapter-01, chapter-02, ...: each is HEAD plus one commit, "
        "the repository as of the end of that chapter. Only committed files count; the working tree and the "
        "index are never touched. Then: `git checkout chapter-01`, `git diff chapter-01 chapter-02`.",
    )

    args = parser.parse_args()

    if args.command == "diff":
        if args.new is None:
            if args.old is not None or len(chapters()) < 2:
                diff.error("give two chapters, e.g. `diff 01 02`")
            args.old, args.new = chapters()[-2:]
        diff_text = book_diff(args.old, args.new) if args.book else chapter_diff(args.old, args.new)
        print(diff_stat(diff_text) if args.stat else diff_text, end="")

    elif args.command == "check":
        problems = check()
        if problems:
            sys.exit("\n".join(["drift check failed:", *problems]))
        print(f"drift check passed: chapters {', '.join(chapters())}; every changed.txt is up to date")

    elif args.command == "carry":
        prefix = f"chapters/{args.chapter}/minisgl/"
        files = [path.removeprefix(prefix) for path in args.files] or None
        try:
            report, conflicts = carry(args.chapter, files, args.base)
        except (ValueError, RuntimeError) as error:
            sys.exit(f"error: {error}")
        print("\n".join(report) if report else f"nothing to carry: {prefix} is as in {args.base}")
        if conflicts:
            sys.exit(
                f"{len(conflicts)} {'copy' if len(conflicts) == 1 else 'copies'} left untouched: make the change "
                f"by hand in {', '.join(conflicts)} (see it with `git diff {args.base} -- {prefix}`), "
                "then run `python tools/chapters.py check`"
            )
        if report:
            print("next: `python tools/chapters.py check`")

    elif args.command == "freeze":
        if args.chapter != chapters()[-1]:
            sys.exit(f"error: only the newest chapter ({chapters()[-1]}) can be frozen")
        try:
            done = freeze(args.chapter)
        except FileExistsError as error:
            sys.exit(f"error: {error}")
        print("\n".join(done))
        nxt = f"{int(args.chapter) + 1:02d}"
        print(f"next: create chapters/{nxt}/ (README.md, conftest.py, tests/, changed.txt), then grow minisgl/")

    elif args.command == "branches":
        try:
            report = make_branches()
        except RuntimeError as error:
            sys.exit(f"error: {error}")
        print("\n".join(report))
        dirty = git("status", "--porcelain", "--", "minisgl", "chapters", "docs")
        if dirty:
            print("note: the branches are made from committed files only; uncommitted changes are not in them")


if __name__ == "__main__":
    main()
