"""Checks of the chapter tooling (tools/chapters.py): diffs, the drift check, carrying fixes, freezing, branches."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tools"))

from course import chapters, snapshot_root

# Loaded by file path: the name `chapters` also belongs to the chapters/ folder and to course.chapters().
_spec = importlib.util.spec_from_file_location("chapters_tool", REPO_ROOT / "tools" / "chapters.py")
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)

PAIRS = list(zip(chapters(), chapters()[1:]))


def run_tool(*args: str, cwd: Path = REPO_ROOT, env=None) -> subprocess.CompletedProcess:
    command = [sys.executable, str(cwd / "tools" / "chapters.py"), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)


def write_files(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


# --- the drift check -------------------------------------------------------------------------------


def test_the_drift_check_passes_on_the_repository():
    problems = tool.check()
    assert not problems, "\n".join(problems)


@pytest.fixture
def fake_snapshots(tmp_path):
    """Two tiny package folders: one file identical, one changed, one added, one removed."""
    old = write_files(tmp_path / "old", {"same.py": "x = 1\n", "fixed.py": "y = 1\n", "gone.py": "z\n",
                                         "__pycache__/same.cpython-311.pyc": "old bytes"})
    new = write_files(tmp_path / "new", {"same.py": "x = 1\n", "fixed.py": "y = 2\n", "added.py": "w\n",
                                         "__pycache__/same.cpython-311.pyc": "new bytes"})
    return old, new


def test_the_drift_check_accepts_an_exact_list(fake_snapshots):
    assert tool.drift_problems(*fake_snapshots, ["fixed.py", "added.py", "gone.py"]) == []


def test_the_drift_check_catches_an_unlisted_difference(fake_snapshots):
    problems = tool.drift_problems(*fake_snapshots, ["added.py", "gone.py"])
    assert len(problems) == 1 and problems[0].startswith("fixed.py: differs") and "not listed" in problems[0]


def test_the_drift_check_catches_unlisted_added_and_removed_files(fake_snapshots):
    problems = tool.drift_problems(*fake_snapshots, ["fixed.py"])
    assert problems == [
        "added.py: added in this chapter but not listed",
        "gone.py: removed in this chapter but not listed",
    ]


def test_the_drift_check_catches_a_stale_list(fake_snapshots):
    problems = tool.drift_problems(*fake_snapshots, ["fixed.py", "added.py", "gone.py", "same.py", "typo.py"])
    assert len(problems) == 2
    assert problems[0].startswith("same.py: listed, but identical") and "stale" in problems[0]
    assert problems[1].startswith("typo.py: listed, but neither chapter has it")


def test_changed_txt_allows_comments_and_blank_lines(tmp_path):
    listing = tmp_path / "changed.txt"
    listing.write_text("# header\n\nkv_cache.py   # why it changed\n  layers/attention.py\n#gone.py\n")
    assert tool.read_changed_list(listing) == ["kv_cache.py", "layers/attention.py"]


def lines(prefix: str, count: int = 10) -> str:
    return "".join(f"{prefix} {i}\n" for i in range(count))


def edit(text: str, *numbers: int) -> str:
    """``text`` with the lines at these indices replaced (one changed line in ten: 90% alike)."""
    return "".join("edited\n" if i in numbers else line for i, line in enumerate(text.splitlines(keepends=True)))


@pytest.fixture
def moved_snapshots(tmp_path):
    """Two package folders where files move: one edited, one exact, one rewritten below git's threshold."""
    old = write_files(tmp_path / "old", {
        "same.py": "x = 1\n",
        "scheduler/stream.py": lines("stream"),
        "util.py": lines("util"),
        "rewritten.py": lines("old"),
        "pkg_a/__init__.py": "",
    })
    new = write_files(tmp_path / "new", {
        "same.py": "x = 1\n",
        "tokenizer/stream.py": edit(lines("stream"), 5),  # 90% alike: the move
        "tokenizer/other.py": edit(lines("stream"), 1, 2, 3),  # 70% alike, less than the other: a new file
        "helpers/util.py": lines("util"),  # 100%
        "replacement.py": lines("old", 4) + lines("new", 6),  # 40% alike: under the threshold
        "pkg_b/__init__.py": "",  # empty files are never paired
    })
    return old, new


MOVES = {"scheduler/stream.py": "tokenizer/stream.py", "util.py": "helpers/util.py"}


def test_renames_pair_each_removed_file_with_the_most_alike_added_file(moved_snapshots):
    assert tool.renames(*moved_snapshots) == MOVES


def test_the_drift_check_accepts_moves_listed_either_way(moved_snapshots):
    others = ["tokenizer/other.py", "pkg_a/__init__.py", "pkg_b/__init__.py"]
    as_moves = [
        "scheduler/stream.py -> tokenizer/stream.py",
        "util.py->helpers/util.py",
        "rewritten.py -> replacement.py",  # not a detected rename, yet a move: removed here, added there
    ]
    assert tool.drift_problems(*moved_snapshots, others + as_moves) == []
    as_paths = ["scheduler/stream.py", "tokenizer/stream.py", "util.py", "helpers/util.py"]
    assert tool.drift_problems(*moved_snapshots, others + as_paths + ["rewritten.py", "replacement.py"]) == []


def test_the_drift_check_catches_a_listed_move_that_is_not_one(moved_snapshots):
    listed = [
        "scheduler/stream.py -> tokenizer/stream.py", "util.py -> helpers/util.py", "rewritten.py", "replacement.py",
        "pkg_a/__init__.py", "pkg_b/__init__.py",
        "same.py -> tokenizer/other.py",  # same.py is in both chapters
        "typo.py -> pkg_a/__init__.py",  # neither exists on its side
        "a.py -> b.py -> c.py",
    ]
    assert tool.drift_problems(*moved_snapshots, listed) == [
        "pkg_a/__init__.py: listed twice",
        "same.py -> tokenizer/other.py: listed as a move, but same.py is still here",
        (
            "typo.py -> pkg_a/__init__.py: listed as a move, but the previous chapter has no typo.py "
            "and this chapter has no pkg_a/__init__.py"
        ),
        "a.py -> b.py -> c.py: neither a path nor a move `old -> new`",
    ]


def test_the_drift_check_suggests_the_move_of_an_unlisted_renamed_file(moved_snapshots):
    listed = ["tokenizer/other.py", "util.py -> helpers/util.py", "rewritten.py", "replacement.py",
              "pkg_a/__init__.py", "pkg_b/__init__.py", "scheduler/stream.py"]
    problems = tool.drift_problems(*moved_snapshots, listed)
    hint = "(moved? list `scheduler/stream.py -> tokenizer/stream.py`)"
    assert problems == [f"tokenizer/stream.py: added in this chapter but not listed {hint}"]


# --- diffs -----------------------------------------------------------------------------------------


def diff_headers(diff: str) -> set[tuple[str, str]]:
    """(a-path, b-path) of every file in a diff: ("minisgl/x.py", "minisgl/x.py")."""
    headers = [line for line in diff.splitlines() if line.startswith("diff --git a/")]
    return {tuple(line.removeprefix("diff --git a/").split(" b/")) for line in headers}


@pytest.mark.parametrize("old,new", PAIRS)
def test_diff_names_the_files_a_chapter_changes(old, new):
    result = run_tool("diff", old, new)
    assert result.returncode == 0, result.stderr
    headers = diff_headers(result.stdout)
    stat = run_tool("diff", old, new, "--stat")
    assert stat.returncode == 0 and "files changed" in stat.stdout
    listed = tool.read_changed_list(REPO_ROOT / "chapters" / new / "changed.txt")
    assert listed
    for entry in listed:
        paths = [f"minisgl/{rel}" for rel in tool.entry_paths(entry)]
        if len(paths) == 2:  # a declared move shows as a rename
            assert tuple(paths) in headers
            assert f" {paths[0]} => {paths[1]} " in stat.stdout
        else:
            assert any(paths[0] in header for header in headers)
    if "kv_cache.py" in listed:
        assert "--- a/minisgl/kv_cache.py\n+++ b/minisgl/kv_cache.py\n" in result.stdout


def apply_diff(diff: str, old_package: Path, work: Path) -> Path:
    """A copy of ``old_package`` with ``diff`` applied by ``git apply`` (outside any repository)."""
    shutil.copytree(old_package, work / "minisgl", ignore=shutil.ignore_patterns("__pycache__"))
    (work / "change.diff").write_text(diff)
    result = subprocess.run(["git", "apply", "change.diff"], cwd=work, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return work / "minisgl"


@pytest.mark.parametrize("old,new", PAIRS)
def test_the_diff_turns_one_chapter_into_the_next(old, new, tmp_path):
    # The exact proof that the diff is complete and correct: git applies it to a copy of chapter `old`
    # and the result is byte for byte chapter `new` (outside any repository, so nothing else is touched).
    patched = apply_diff(tool.chapter_diff(old, new), snapshot_root(old) / "minisgl", tmp_path)
    assert tool.changed_files(patched, snapshot_root(new) / "minisgl") == {}


def test_a_moved_file_shows_as_a_rename(moved_snapshots):
    diff = tool.package_diff(*moved_snapshots)
    assert (
        "diff --git a/minisgl/scheduler/stream.py b/minisgl/tokenizer/stream.py\n"
        "similarity index 90%\n"
        "rename from minisgl/scheduler/stream.py\n"
        "rename to minisgl/tokenizer/stream.py\n"
        "--- a/minisgl/scheduler/stream.py\n"
        "+++ b/minisgl/tokenizer/stream.py\n"
        "@@ -3,7 +3,7 @@\n"
    ) in diff
    assert "-stream 5\n+edited\n" in diff
    # An exact move has no hunks: the next file follows at once.
    assert (
        "diff --git a/minisgl/util.py b/minisgl/helpers/util.py\n"
        "similarity index 100%\nrename from minisgl/util.py\nrename to minisgl/helpers/util.py\ndiff --git "
    ) in diff
    assert diff_headers(diff) == {
        ("minisgl/scheduler/stream.py", "minisgl/tokenizer/stream.py"),
        ("minisgl/util.py", "minisgl/helpers/util.py"),
        ("minisgl/tokenizer/other.py", "minisgl/tokenizer/other.py"),
        ("minisgl/rewritten.py", "minisgl/rewritten.py"),
        ("minisgl/replacement.py", "minisgl/replacement.py"),
        ("minisgl/pkg_a/__init__.py", "minisgl/pkg_a/__init__.py"),
        ("minisgl/pkg_b/__init__.py", "minisgl/pkg_b/__init__.py"),
    }


def test_git_applies_a_diff_with_renames(moved_snapshots, tmp_path):
    old, new = moved_snapshots
    patched = apply_diff(tool.package_diff(old, new), old, tmp_path / "work")
    assert tool.changed_files(patched, new) == {}


def test_a_moved_binary_file_is_a_rename_without_hunks(tmp_path):
    (tmp_path / "old" / "data").mkdir(parents=True)
    (tmp_path / "new" / "assets").mkdir(parents=True)
    (tmp_path / "old" / "data" / "table.bin").write_bytes(bytes(range(256)))
    (tmp_path / "new" / "assets" / "table.bin").write_bytes(bytes(range(256)))
    diff = tool.package_diff(tmp_path / "old", tmp_path / "new")
    assert diff == (
        "diff --git a/minisgl/data/table.bin b/minisgl/assets/table.bin\n"
        "similarity index 100%\nrename from minisgl/data/table.bin\nrename to minisgl/assets/table.bin\n"
    )
    patched = apply_diff(diff, tmp_path / "old", tmp_path / "work")
    assert tool.changed_files(patched, tmp_path / "new") == {}


def test_the_stat_shows_a_rename_with_its_real_counts(moved_snapshots):
    stat = tool.diff_stat(tool.package_diff(*moved_snapshots)).splitlines()
    name = "minisgl/scheduler/stream.py => minisgl/tokenizer/stream.py"
    assert [line for line in stat if "=>" in line] == [
        f" {'minisgl/util.py => minisgl/helpers/util.py':<{len(name)}} |     0 ",  # in the place of its new path
        f" {name} |     2 +-",
    ]
    assert stat[-1] == " 7 files changed, 21 insertions(+), 11 deletions(-)"  # 1 + 10 + 10 added


def test_counts_per_file_name_the_change(moved_snapshots):
    counts = {c["path"]: c for c in tool.diff_counts(tool.package_diff(*moved_snapshots))}
    assert counts["minisgl/tokenizer/stream.py"] == {
        "path": "minisgl/tokenizer/stream.py", "from": "minisgl/scheduler/stream.py", "change": "moved",
        "added": 1, "removed": 1,
    }
    assert counts["minisgl/helpers/util.py"]["change"] == "moved" and counts["minisgl/helpers/util.py"]["added"] == 0
    assert {c["change"] for c in counts.values()} <= {"moved", "new", "changed", "removed"}


@pytest.mark.parametrize("old,new", PAIRS)
def test_the_book_diff_is_the_diff_without_region_markers(old, new, tmp_path):
    shown = tool.book_diff(old, new)
    assert "--8<--" not in shown
    # Apart from the markers it is the real change: applied to chapter `old` stripped of its markers, it
    # gives chapter `new` stripped of its markers.
    patched = apply_diff(shown, tool.without_region_markers(snapshot_root(old) / "minisgl", tmp_path / "old"),
                         tmp_path / "work")
    expected = tool.without_region_markers(snapshot_root(new) / "minisgl", tmp_path / "new")
    assert tool.changed_files(patched, expected) == {}
    # The page wraps the diff in a ```diff fence; a context line " ```" of the code would close it early.
    fences = [line for line in shown.splitlines() if line.lstrip().startswith(("```", "~~~"))]
    assert not fences, f"the {old}-{new} diff has lines that close a ``` fence: wrap it in a longer fence (````diff)"


# --- carrying a fix to the later chapters ---------------------------------------------------------

BEFORE = lines("line")
FIXED = BEFORE.replace("line 2\n", "line 2 fixed\n")


def git_repo(root: Path) -> Path:
    """``root`` as a git repository with everything in it committed."""
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"]):
        subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)
    return root


@pytest.fixture
def course_repo(tmp_path):
    """A fake course in git: chapters 01 and 02 frozen, 03 the newest (top-level minisgl/).

    Every file starts as BEFORE in chapter 01. Chapter 02 edits merged.py far from line 2 and clash.py
    on line 2, moves moved.py (declaring it) and removes gone.py; chapter 03 has gone.py again.
    """
    ch02_merged = BEFORE.replace("line 8\n", "line 8 of chapter 02\n")
    ch02_clash = BEFORE.replace("line 2\n", "line 2 of chapter 02\n")
    files = {name: BEFORE for name in ("copied.py", "merged.py", "clash.py", "moved.py", "gone.py")}
    write_files(tmp_path, {f"chapters/01/minisgl/{name}": text for name, text in files.items()})
    later = {"copied.py": BEFORE, "merged.py": ch02_merged, "clash.py": ch02_clash, "pkg/moved.py": BEFORE}
    write_files(tmp_path, {f"chapters/02/minisgl/{name}": text for name, text in later.items()})
    write_files(tmp_path, {f"minisgl/{name}": text for name, text in later.items()} | {"minisgl/gone.py": BEFORE})
    write_files(tmp_path, {
        "chapters/02/changed.txt": "merged.py\nclash.py\nmoved.py -> pkg/moved.py  # declared\ngone.py\n",
        "chapters/03/changed.txt": "gone.py\n",
    })
    git_repo(tmp_path)
    for name in files:  # the fix, made in chapter 01 and not committed
        (tmp_path / "chapters/01/minisgl" / name).write_text(FIXED)
    return tmp_path


def test_carry_copies_a_fix_into_later_copies_of_the_old_version(course_repo):
    report, conflicts = tool.carry("01", ["copied.py"], root=course_repo)
    assert (course_repo / "chapters/02/minisgl/copied.py").read_text() == FIXED
    assert (course_repo / "minisgl/copied.py").read_text() == FIXED
    assert conflicts == [] and "  minisgl/copied.py: copied" in "\n".join(report)


def test_carry_merges_a_fix_into_a_later_copy_changed_elsewhere(course_repo):
    report, conflicts = tool.carry("01", ["merged.py"], root=course_repo)
    both = FIXED.replace("line 8\n", "line 8 of chapter 02\n")
    assert (course_repo / "chapters/02/minisgl/merged.py").read_text() == both
    assert (course_repo / "minisgl/merged.py").read_text() == both
    assert conflicts == [] and "  minisgl/merged.py: merged" in "\n".join(report)


def test_carry_leaves_a_conflicting_copy_untouched_and_names_it(course_repo):
    report, conflicts = tool.carry("01", ["clash.py"], root=course_repo)
    assert conflicts == ["chapters/02/minisgl/clash.py", "minisgl/clash.py"]
    for copy in conflicts:
        assert (course_repo / copy).read_text() == BEFORE.replace("line 2\n", "line 2 of chapter 02\n")
        assert f"  {copy}: conflict" in "\n".join(report)


def test_carry_follows_a_declared_move_and_stops_where_a_file_was_removed(course_repo):
    report, conflicts = tool.carry("01", ["moved.py", "gone.py"], root=course_repo)
    assert conflicts == []
    assert (course_repo / "chapters/02/minisgl/pkg/moved.py").read_text() == FIXED
    assert (course_repo / "minisgl/pkg/moved.py").read_text() == FIXED
    assert (course_repo / "minisgl/gone.py").read_text() == BEFORE  # chapter 02 removed it: not carried past
    assert any(line.startswith("  chapters/02/minisgl/gone.py: not there") for line in report), report


def test_carry_finds_the_changed_files_in_git_or_takes_a_base(course_repo):
    (course_repo / "chapters/01/minisgl/untracked.py").write_text("new\n")
    report, conflicts = tool.carry("01", root=course_repo)
    carried = [line.split(":")[0] for line in report if not line.startswith(" ")]
    names = ["clash.py", "copied.py", "gone.py", "merged.py", "moved.py"]  # not untracked.py: no base to merge from
    assert carried == [f"chapters/01/minisgl/{name}" for name in names]
    assert conflicts == ["chapters/02/minisgl/clash.py", "minisgl/clash.py"]
    # The fix committed already: name the file and the commit before it.
    (course_repo / "chapters/01/minisgl/copied.py").write_text(FIXED.replace("line 5\n", "line 5 fixed\n"))
    git_repo(course_repo)
    report, _ = tool.carry("01", ["copied.py"], base="HEAD~1", root=course_repo)
    assert (course_repo / "minisgl/copied.py").read_text() == FIXED.replace("line 5\n", "line 5 fixed\n")
    assert "  minisgl/copied.py: merged" in "\n".join(report)


def test_the_carry_command_fails_on_a_conflict_and_says_what_to_do(course_repo):
    shutil.copytree(REPO_ROOT / "tools", course_repo / "tools", ignore=shutil.ignore_patterns("__pycache__"))
    result = run_tool("carry", "1", "chapters/01/minisgl/clash.py", cwd=course_repo)
    assert result.returncode == 1
    assert "chapters/02/minisgl/clash.py: conflict" in result.stdout
    assert "make the change by hand in chapters/02/minisgl/clash.py" in result.stderr
    newest = run_tool("carry", "03", cwd=course_repo)
    assert newest.returncode == 1 and "no later chapter" in newest.stderr


# --- freezing a chapter ----------------------------------------------------------------------------


def test_freeze_copies_the_package_and_repoints_the_chapter_page(tmp_path):
    write_files(tmp_path, {
        "minisgl/__init__.py": "",
        "minisgl/layers/norm.py": "norm\n",
        "minisgl/__pycache__/x.cpython-311.pyc": "bytes",
        "chapters/03/README.md": "",
        "docs/chapters/03.md": '--8<-- "minisgl/layers/norm.py:rmsnorm"\n\n--8<--\nminisgl/__init__.py\n--8<--\n'
                               'the folder minisgl/ is prose\n',
    })
    done = tool.freeze("03", root=tmp_path)
    assert done
    frozen = tmp_path / "chapters" / "03" / "minisgl"
    assert (frozen / "layers" / "norm.py").read_text() == "norm\n" and not (frozen / "__pycache__").exists()
    assert (tmp_path / "docs" / "chapters" / "03.md").read_text() == (
        '--8<-- "chapters/03/minisgl/layers/norm.py:rmsnorm"\n\n--8<--\nchapters/03/minisgl/__init__.py\n--8<--\n'
        'the folder minisgl/ is prose\n'
    )
    with pytest.raises(FileExistsError, match="frozen already"):
        tool.freeze("03", root=tmp_path)


# --- chapter branches ------------------------------------------------------------------------------


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def test_branches_in_a_clone(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(clone)], check=True, capture_output=True)
    # Run this working tree's tools (they may not be committed yet); branches only read committed files.
    for name in ("chapters.py", "course.py"):
        shutil.copy(REPO_ROOT / "tools" / name, clone / "tools" / name)
    # On a chapter branch, the clone starts on that branch, which `branches` would have to replace: detach.
    git(clone, "checkout", "-q", "--detach")
    status_before = git(clone, "status", "--porcelain")
    index_before = (clone / ".git" / "index").read_bytes()
    identity = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
                "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}
    for _ in range(2):  # a second run replaces the branches
        result = run_tool("branches", cwd=clone, env=os.environ | identity)
        assert result.returncode == 0, result.stderr
    index_after = (clone / ".git" / "index").read_bytes()

    numbers = [c for c in git(clone, "ls-tree", "-d", "--name-only", "HEAD", "chapters/").split() if c[-2:].isdigit()]
    numbers = [c[-2:] for c in numbers]
    first = numbers[0]
    kv_cache = git(clone, "show", f"chapter-{first}:minisgl/kv_cache.py")
    frozen = len(numbers) > 1  # on the branch of the first chapter, that chapter is the top level already
    assert kv_cache == git(clone, "show", f"HEAD:{f'chapters/{first}/' if frozen else ''}minisgl/kv_cache.py")
    tree = git(clone, "ls-tree", "-r", "--name-only", f"chapter-{first}")
    assert f"chapters/{first}/tests/" in tree and f"chapters/{first}/minisgl/" not in tree
    for later in numbers[1:]:
        assert f"chapters/{later}/" not in tree
    docs = git(clone, "ls-tree", "-r", "--name-only", f"chapter-{first}", "docs/chapters/").split()
    nav = git(clone, "show", f"chapter-{first}:mkdocs.yml")
    assert f"docs/chapters/{first}.md" in docs and f"chapters/{first}.md" in nav
    for later in numbers[1:]:
        assert not [p for p in docs if p.startswith(f"docs/chapters/{later}")] and f"chapters/{later}" not in nav
    page = git(clone, "show", f"chapter-{first}:docs/chapters/{first}.md")
    assert '--8<-- "minisgl/' in page and f'"chapters/{first}/minisgl/' not in page
    newest = numbers[-1]
    assert git(clone, "rev-parse", f"chapter-{newest}:minisgl") == git(clone, "rev-parse", "HEAD:minisgl")
    assert git(clone, "rev-parse", f"chapter-{newest}^") == git(clone, "rev-parse", "HEAD")

    # Neither the working tree nor the real index was touched.
    assert index_after == index_before
    assert git(clone, "status", "--porcelain") == status_before
