"""Chapter tooling: what each chapter changes, the drift check, freezing a chapter, chapter branches.

    python tools/chapters.py diff 01 02          # what chapter 02 changes, as a unified diff
    python tools/chapters.py diff 01 02 --stat   # the same, one line per file
    python tools/chapters.py diff --write        # store each consecutive pair as docs/diffs/NN-MM.diff
    python tools/chapters.py check               # the drift check (tests/test_chapters.py runs it too)
    python tools/chapters.py freeze 02           # before chapter 03 begins: copy minisgl/ to chapters/02/
    python tools/chapters.py branches            # local git branches chapter-01, chapter-02, ...

Every chapter's code is the whole package ``minisgl`` (its "snapshot"): ``chapters/NN/minisgl/`` once
a later chapter has frozen it, the top-level ``minisgl/`` for the newest chapter. Snapshots are
copies, so a fix made in one stage must be carried to every later stage that has the same code. The
drift check keeps the copies honest. Each chapter NN >= 02 lists in ``chapters/NN/changed.txt``
every file it adds, changes or removes relative to chapter NN-1, one path per line, relative to
the package folder (``kv_cache.py``, ``layers/attention.py``); ``#`` starts a comment, so a line may
say why. ``check`` fails, naming the files, when

- a file that both chapters have differs and is not listed (a fix not carried over, or a change the
  chapter forgot to declare), or a file is added or removed and not listed;
- a listed file is in fact identical in both chapters (a stale list), or in neither;
- a stored ``docs/diffs/NN-MM.diff`` differs from a fresh diff (run ``diff --write`` again).

The book shows each stored diff on the chapter's page ("What changed since the last chapter"). It is
included with pymdownx.snippets, which would read a line of the diff that looks like a snippet
marker as an instruction (include a file, or drop the line as a section marker), so the stored copy
escapes such lines the way pymdownx.snippets expects: the page shows them exactly as in the code.
"""

import argparse
import difflib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from course import CHAPTERS_DIR, REPO_ROOT, chapters, snapshot_root

DIFFS_DIR = REPO_ROOT / "docs" / "diffs"
DIFF_NAME = re.compile(r"\d\d-\d\d\.diff")
WRITE_HINT = "run `python tools/chapters.py diff --write`"


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


def file_diff(rel: str, old: Path | None, new: Path | None) -> list[str]:
    """The diff of one file, in git's format, so ``git apply`` and diff highlighters understand it.

    ``old`` is None for a file the new chapter adds, ``new`` is None for one it removes.
    """
    name = f"minisgl/{rel}"
    lines = [f"diff --git a/{name} b/{name}\n"]
    if old is None:
        lines.append(f"new file mode {file_mode(new)}\n")
    if new is None:
        lines.append(f"deleted file mode {file_mode(old)}\n")
    try:
        before = old.read_text(encoding="utf-8").splitlines(keepends=True) if old else []
        after = new.read_text(encoding="utf-8").splitlines(keepends=True) if new else []
    except UnicodeDecodeError:
        a, b = (f"a/{name}" if old else "/dev/null"), (f"b/{name}" if new else "/dev/null")
        return lines + [f"Binary files {a} and {b} differ\n"]
    hunks = difflib.unified_diff(
        before, after, fromfile=f"a/{name}" if old else "/dev/null", tofile=f"b/{name}" if new else "/dev/null"
    )
    for line in hunks:
        # The last line of a file may lack its newline; say so the way diff and git do.
        lines.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return lines


def package_diff(old: Path, new: Path) -> str:
    """The unified diff from package folder ``old`` to ``new``, file by file in path order."""
    out = []
    for rel, status in changed_files(old, new).items():
        out += file_diff(rel, None if status == "added" else old / rel, None if status == "removed" else new / rel)
    return "".join(out)


def diff_stat(diff: str) -> str:
    """One line per file (how many lines it adds and removes) and a total, like ``git diff --stat``."""
    counts: dict[str, list[int]] = {}
    current, in_hunk = None, False
    for line in diff.splitlines():
        if line.startswith("diff --git a/"):
            current, in_hunk = line.split(" b/", 1)[1], False
            counts[current] = [0, 0]
        elif line.startswith("@@"):
            in_hunk = True  # before the first hunk come the file names (--- a/..., +++ b/...)
        elif in_hunk and line.startswith("+"):
            counts[current][0] += 1
        elif in_hunk and line.startswith("-"):
            counts[current][1] += 1
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


def chapter_package(chapter: str) -> Path:
    return snapshot_root(chapter) / "minisgl"


def chapter_diff(old: str, new: str) -> str:
    return package_diff(chapter_package(old), chapter_package(new))


# ------------------------------------------------------------------------------------------------
# The stored diffs the book includes (docs/diffs/NN-MM.diff)
# ------------------------------------------------------------------------------------------------


def snippet_patterns() -> tuple[re.Pattern, re.Pattern]:
    """The two line patterns pymdownx.snippets acts on, taken from the installed pymdownx itself.

    A line matching the first includes a file (``--8<-- "path"``) or opens and closes a block of paths
    (``--8<--`` alone); a line matching the second is a section marker (``# --8<-- [start:name]``),
    which snippets drops when it includes a whole file. Using pymdownx's own patterns keeps the
    escaping below exactly in step with the version that builds the book.
    """
    from pymdownx.snippets import SnippetPreprocessor

    return SnippetPreprocessor.RE_ALL_SNIPPETS, SnippetPreprocessor.RE_SNIPPET_SECTION


def escape_for_the_book(diff: str) -> str:
    """Escape every line pymdownx.snippets would act on, so the book shows the diff as it is.

    pymdownx.snippets' escape is a ``;`` in front of the marker (in front of any ``;`` already there):
    snippets removes one ``;`` and shows the rest of the line untouched. A line like
    ``-    # --8<-- [start:ex-kv-attention]`` becomes ``-    # ;--8<-- [start:ex-kv-attention]``.
    """
    include, section = snippet_patterns()
    out = []
    for line in diff.splitlines(keepends=True):
        text = line.rstrip("\n")
        match = include.match(text) or section.match(text)
        if match:
            at = match.start("escape")
            line = line[:at] + ";" + line[at:]
        out.append(line)
    return "".join(out)


def book_diff(old: str, new: str) -> str:
    """The diff from chapter ``old`` to ``new`` as stored in docs/diffs for the book."""
    return escape_for_the_book(chapter_diff(old, new))


def consecutive_pairs() -> list[tuple[str, str]]:
    numbers = chapters()
    return list(zip(numbers, numbers[1:]))


def expected_diff_files() -> dict[str, str]:
    """docs/diffs file name -> the content it should have now."""
    return {f"{old}-{new}.diff": book_diff(old, new) for old, new in consecutive_pairs()}


def write_diffs(diffs_dir: Path = DIFFS_DIR) -> list[Path]:
    """Store each consecutive pair's diff, and remove stored diffs of pairs that no longer exist."""
    diffs_dir.mkdir(parents=True, exist_ok=True)
    expected = expected_diff_files()
    for stale in diffs_dir.iterdir():
        if DIFF_NAME.fullmatch(stale.name) and stale.name not in expected:
            stale.unlink()
    written = []
    for name, text in expected.items():
        (diffs_dir / name).write_text(text, encoding="utf-8")
        written.append(diffs_dir / name)
    return written


def stored_diff_problems(diffs_dir: Path = DIFFS_DIR) -> list[str]:
    """Check (c): every stored diff is present and the same as a fresh one."""
    problems = []
    expected = expected_diff_files()
    shown = diffs_dir.relative_to(REPO_ROOT) if diffs_dir.is_relative_to(REPO_ROOT) else diffs_dir
    for name, text in expected.items():
        path = diffs_dir / name
        if not path.is_file():
            problems.append(f"{shown}/{name} is missing: {WRITE_HINT}")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"{shown}/{name} is out of date with the code: {WRITE_HINT}")
    if diffs_dir.is_dir():
        for path in sorted(diffs_dir.iterdir()):
            if DIFF_NAME.fullmatch(path.name) and path.name not in expected:
                problems.append(f"{shown}/{path.name} is not a pair of consecutive chapters: {WRITE_HINT}")
    return problems


# ------------------------------------------------------------------------------------------------
# The drift check
# ------------------------------------------------------------------------------------------------


def read_changed_list(path: Path) -> list[str]:
    """The paths listed in a changed.txt, in order; ``#`` starts a comment, blank lines are skipped."""
    listed = []
    for line in path.read_text(encoding="utf-8").splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry:
            listed.append(entry)
    return listed


def drift_problems(old: Path, new: Path, listed: list[str]) -> list[str]:
    """Compare two package folders with the list of files the newer one declares as changed.

    Returns one message per problem (empty when the list is exactly the set of files that differ).
    This is the heart of the drift check; it takes plain folders so a test can hand it fake ones.
    """
    problems = []
    actual = changed_files(old, new)
    before, after = package_files(old), package_files(new)
    seen = set()
    for rel in listed:
        if rel in seen:
            problems.append(f"{rel}: listed twice")
        seen.add(rel)
    for rel, status in actual.items():
        if rel in seen:
            continue
        if status == "changed":
            problems.append(
                f"{rel}: differs from the previous chapter but is not listed "
                "(a fix not carried over to this chapter, or a change it forgot to declare)"
            )
        else:
            problems.append(f"{rel}: {status} in this chapter but not listed")
    for rel in sorted(seen - actual.keys()):
        if rel in before or rel in after:
            problems.append(f"{rel}: listed, but identical in both chapters (a stale list: remove the line)")
        else:
            problems.append(f"{rel}: listed, but neither chapter has it (a typo?)")
    return problems


def check() -> list[str]:
    """The whole drift check of the repository: every chapter's changed.txt, then the stored diffs."""
    problems = []
    for old, new in consecutive_pairs():
        changed_txt = CHAPTERS_DIR / new / "changed.txt"
        if not changed_txt.is_file():
            problems.append(f"chapters/{new}/changed.txt is missing: list the files chapter {new} changes")
            continue
        for problem in drift_problems(chapter_package(old), chapter_package(new), read_changed_list(changed_txt)):
            problems.append(f"chapters/{new}/changed.txt: minisgl/{problem}")
    return problems + stored_diff_problems()


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
    result = subprocess.run(["git", *args], cwd=root, env=env, input=stdin, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout if raw else result.stdout.strip()


def in_head(path: str, root: Path = REPO_ROOT) -> bool:
    """Whether HEAD's tree has ``path`` (a file or a folder)."""
    return subprocess.run(["git", "cat-file", "-e", f"HEAD:{path}"], cwd=root, capture_output=True).returncode == 0


def make_branches(root: Path = REPO_ROOT) -> list[str]:
    """Create or replace ``chapter-NN`` for every chapter committed in HEAD; returns a line per branch.

    Branch chapter-NN is one commit on top of HEAD whose tree is HEAD's with
      - the top-level ``minisgl/`` replaced by chapter NN's snapshot (``chapters/NN/minisgl``),
      - that copy removed (it is now the top level) and the chapter's page pointed back at ``minisgl/``,
      - the folders of the later chapters removed.
    Only git plumbing on a temporary index file is used: the working tree and the real index are never
    touched, and only committed files count (uncommitted edits are not in the branches).
    """
    head = git("rev-parse", "--verify", "HEAD^{commit}", root=root)
    current = subprocess.run(["git", "symbolic-ref", "-q", "HEAD"], cwd=root, capture_output=True, text=True)
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
            remove = later + (["minisgl", f"chapters/{chapter}/minisgl"] if frozen else [])
            if remove:
                git("rm", "--cached", "-r", "-q", "--ignore-unmatch", "--", *remove, env=env, root=root)
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
    diff.add_argument("--write", action="store_true", help="store every consecutive pair in docs/diffs/NN-MM.diff")

    commands.add_parser("check", help="fail if a chapter's changed.txt or a stored diff disagrees with the code")

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
        if args.write:
            if args.old or args.new or args.stat:
                diff.error("diff --write stores every consecutive pair; give it no chapters and no --stat")
            for path in write_diffs():
                print(f"wrote {path.relative_to(REPO_ROOT)}")
            return
        if args.new is None:
            if args.old is not None or len(chapters()) < 2:
                diff.error("give two chapters, e.g. `diff 01 02`")
            args.old, args.new = chapters()[-2:]
        diff_text = chapter_diff(args.old, args.new)
        print(diff_stat(diff_text) if args.stat else diff_text, end="")

    elif args.command == "check":
        problems = check()
        if problems:
            sys.exit("\n".join(["drift check failed:", *problems]))
        print(f"drift check passed: chapters {', '.join(chapters())}; changed.txt lists and docs/diffs are up to date")

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
