"""Checks of the chapter tooling (tools/chapters.py): diffs, the drift check, freezing, chapter branches."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tools"))

from course import chapters, snapshot_root  # noqa: E402

# Loaded by file path: the name `chapters` also belongs to the chapters/ folder and to course.chapters().
_spec = importlib.util.spec_from_file_location("chapters_tool", REPO_ROOT / "tools" / "chapters.py")
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)

PAIRS = list(zip(chapters(), chapters()[1:]))


def run_tool(*args: str, cwd: Path = REPO_ROOT, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(cwd / "tools" / "chapters.py"), *args], cwd=cwd, env=env, capture_output=True, text=True
    )


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


@pytest.mark.skipif(not PAIRS, reason="needs two chapters")
def test_an_out_of_date_stored_diff_is_reported(tmp_path):
    diffs = tmp_path / "diffs"
    shutil.copytree(REPO_ROOT / "docs" / "diffs", diffs)
    first = f"{PAIRS[0][0]}-{PAIRS[0][1]}.diff"
    (diffs / first).write_text((diffs / first).read_text() + "+an edit the code never got\n")
    (diffs / "98-99.diff").write_text("")
    problems = tool.stored_diff_problems(diffs)
    assert any(first in p and "out of date" in p and "diff --write" in p for p in problems), problems
    assert any("98-99.diff" in p for p in problems), problems
    (diffs / first).unlink()
    assert any(first in p and "missing" in p for p in tool.stored_diff_problems(diffs))


# --- diffs -----------------------------------------------------------------------------------------


@pytest.mark.skipif(not PAIRS, reason="needs two chapters")
def test_diff_names_the_files_a_chapter_changes():
    old, new = PAIRS[0]
    result = run_tool("diff", old, new)
    assert result.returncode == 0, result.stderr
    changed = tool.read_changed_list(REPO_ROOT / "chapters" / new / "changed.txt")
    assert changed
    for rel in changed:
        assert f"diff --git a/minisgl/{rel} b/minisgl/{rel}\n" in result.stdout
    if "kv_cache.py" in changed:
        assert "--- a/minisgl/kv_cache.py\n+++ b/minisgl/kv_cache.py\n" in result.stdout
    stat = run_tool("diff", old, new, "--stat")
    assert stat.returncode == 0 and f" minisgl/{changed[0]} " in stat.stdout and "files changed" in stat.stdout


@pytest.mark.parametrize("old,new", PAIRS)
def test_the_diff_turns_one_chapter_into_the_next(old, new, tmp_path):
    # The exact proof that the diff is complete and correct: git applies it to a copy of chapter `old`
    # and the result is byte for byte chapter `new` (outside any repository, so nothing else is touched).
    shutil.copytree(snapshot_root(old) / "minisgl", tmp_path / "minisgl", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "change.diff").write_text(tool.chapter_diff(old, new))
    result = subprocess.run(["git", "apply", "change.diff"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert tool.changed_files(tmp_path / "minisgl", snapshot_root(new) / "minisgl") == {}


def render_snippet(path: Path) -> list[str]:
    """What pymdownx.snippets, configured like the book, puts on the page for `--8<-- "path"`."""
    import markdown

    config = {"base_path": [str(path.parent)], "check_paths": True, "dedent_subsections": True}
    md = markdown.Markdown(extensions=["pymdownx.snippets"], extension_configs={"pymdownx.snippets": config})
    return md.preprocessors["snippet"].run([f'--8<-- "{path.name}"'])


def test_the_book_shows_lines_that_look_like_snippet_markers_as_they_are(tmp_path):
    raw = "".join([
        "diff --git a/minisgl/x.py b/minisgl/x.py\n",
        "@@ -1,7 +1,7 @@\n",
        "-    # --8<-- [start:ex-old]\n",  # a section marker: snippets would drop the line
        "+    # --8<-- [end:new-name]\n",
        " # ;--8<-- [start:escaped-already]\n",  # escaped in the source: must stay escaped on the page
        ' --8<-- "does/not/exist.md"\n',  # an include: snippets would try to read the file
        "---8<--\n",  # a block marker
        "+;--8<-- 'x'\n",
        "+text with --8<-- in the middle\n",
    ])
    (tmp_path / "x.diff").write_text(tool.escape_for_the_book(raw))
    assert render_snippet(tmp_path / "x.diff") == raw.split("\n")


@pytest.mark.parametrize("old,new", PAIRS)
def test_the_book_shows_each_stored_diff_exactly(old, new):
    stored = REPO_ROOT / "docs" / "diffs" / f"{old}-{new}.diff"
    assert render_snippet(stored) == tool.chapter_diff(old, new).split("\n")
    # The page wraps the diff in a ```diff fence; a context line " ```" of the code would close it early.
    fences = [line for line in stored.read_text().splitlines() if line.lstrip().startswith(("```", "~~~"))]
    assert not fences, f"{stored.name} has lines that close a ``` fence: wrap it in a longer fence (````diff)"


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
    assert kv_cache == git(clone, "show", f"HEAD:chapters/{first}/minisgl/kv_cache.py")
    tree = git(clone, "ls-tree", "-r", "--name-only", f"chapter-{first}")
    assert f"chapters/{first}/tests/" in tree and f"chapters/{first}/minisgl/" not in tree
    for later in numbers[1:]:
        assert f"chapters/{later}/" not in tree
    page = git(clone, "show", f"chapter-{first}:docs/chapters/{first}.md")
    assert '--8<-- "minisgl/' in page and f'"chapters/{first}/minisgl/' not in page
    newest = numbers[-1]
    assert git(clone, "rev-parse", f"chapter-{newest}:minisgl") == git(clone, "rev-parse", "HEAD:minisgl")
    assert git(clone, "rev-parse", f"chapter-{newest}^") == git(clone, "rev-parse", "HEAD")

    # Neither the working tree nor the real index was touched.
    assert index_after == index_before
    assert git(clone, "status", "--porcelain") == status_before
